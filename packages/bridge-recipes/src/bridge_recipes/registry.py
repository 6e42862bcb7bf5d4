"""Every recipe by its CLI name ``<model>_<task>`` (task: pretrain, sft, lora, dora): the one list ``bridge-run``
reads. Listing and describing recipes imports neither torch nor megatron-core.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any

from .llama._spec import SPECS, LlamaSpec, Parallelism

__all__ = ["RECIPES", "TASKS", "Recipe", "get_recipe"]

TASKS = ("pretrain", "sft", "lora", "dora")


@dataclass(frozen=True, slots=True)
class Recipe:
    """One CLI recipe: a model's pretrain / SFT / LoRA / DoRA config function."""

    name: str
    spec: LlamaSpec
    task: str

    @property
    def is_finetune(self) -> bool:
        """SFT and PEFT recipes start from pretrained weights and run ``finetune()``."""
        return self.task != "pretrain"

    @property
    def layout(self) -> Parallelism:
        return {"pretrain": self.spec.pretrain, "sft": self.spec.sft}.get(self.task, self.spec.peft)

    @property
    def description(self) -> str:
        """One line: what the recipe trains, with its sequence length, global batch, layout and learning rate."""
        spec, layout = self.spec, self.layout
        procs = layout.model_parallel_size
        where = f"{layout.describe()}, {procs} process{'es' if procs > 1 else ''} per replica"
        if self.task == "pretrain":
            return (f"pretrain {spec.display_name} on mock data: seq {spec.pretrain_seq_length}, global batch 512, "
                    f"{where}, lr 3e-4 cosine")
        if self.task == "sft":
            return (f"full SFT of {spec.display_name} on packed mock SFT data: seq {spec.finetune_seq_length}, "
                    f"global batch {spec.sft_global_batch_size}, {where}, lr 5e-6")
        targets = "all linear layers" if len(spec.lora_targets) == 4 else "+".join(spec.lora_targets)
        alpha = spec.dora_alpha if self.task == "dora" and spec.dora_alpha is not None else spec.lora_alpha
        return (f"{'LoRA' if self.task == 'lora' else 'DoRA'} (dim {spec.lora_dim}, alpha {alpha}, "
                f"{targets}) of {spec.display_name}: seq {spec.finetune_seq_length}, global batch "
                f"{spec.peft_global_batch_size}, {where}, lr 1e-4")

    def module(self):
        """The model module (``bridge_recipes.llama.<model>``)."""
        return importlib.import_module(f"bridge_recipes.llama.{self.spec.name}")

    def build(self, **kwargs: Any):
        """The recipe's ConfigContainer; ``kwargs`` are the config function's keyword arguments."""
        module = self.module()
        if self.task == "pretrain":
            return module.pretrain_config(**kwargs)
        if self.task == "sft":
            return module.sft_config(**kwargs)
        kwargs.setdefault("peft", self.task)
        return module.peft_config(**kwargs)


RECIPES: dict[str, Recipe] = {f"{name}_{task}": Recipe(name=f"{name}_{task}", spec=spec, task=task)
                              for name, spec in SPECS.items() for task in TASKS}
"""All 28 recipes, in model then task order."""


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
        KeyError: for an unknown name; the message lists the nearest names.
    """
    if name in RECIPES:
        return RECIPES[name]
    base, _, task = name.rpartition("_")
    if task not in TASKS:
        base, task = name, ""
    near = []
    for model in difflib.get_close_matches(base, list(SPECS), n=2, cutoff=0.75):  # the model's recipes first
        near += [f"{model}_{task}"] if task else [f"{model}_{t}" for t in TASKS]
    near = list(dict.fromkeys(near + difflib.get_close_matches(name, list(RECIPES), n=4, cutoff=0.6)))[:6]
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise KeyError(f"unknown recipe {name!r}{hint} (`bridge-run list` shows all {len(RECIPES)})")
