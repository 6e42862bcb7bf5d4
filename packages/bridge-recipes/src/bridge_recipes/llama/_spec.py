"""What defines each Llama recipe: the model's HF config.json (shipped in ``hf_configs/``, the one place each model
shape is written down) and the parallel layouts and batch sizes of the published Megatron Bridge recipes.

Nothing here imports torch or megatron-core, so ``bridge-run list`` and ``--help`` stay fast.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["ALL_LINEAR", "SPECS", "LlamaSpec", "Parallelism", "hf_config"]

ALL_LINEAR = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""LoRA / DoRA targets of every recipe but 405B: every linear layer of attention and MLP."""


@dataclass(frozen=True, slots=True)
class Parallelism:
    """A model-parallel layout: tensor, pipeline, virtual pipeline, context parallel sizes, sequence parallel."""

    tp: int = 1
    pp: int = 1
    vp: int | None = None
    cp: int = 1
    sp: bool = False

    @property
    def model_parallel_size(self) -> int:
        """Processes one model replica spans (TP x PP x CP): the run needs a multiple of this."""
        return self.tp * self.pp * self.cp

    def describe(self) -> str:
        """``TP4 PP4 VP5 CP2 SP`` (sizes of 1 and an unset VP are left out; ``TP1`` when all are 1)."""
        parts = [f"{name}{size}" for name, size in (("TP", self.tp), ("PP", self.pp), ("VP", self.vp),
                                                    ("CP", self.cp)) if size and size > 1]
        if self.sp:
            parts.append("SP")
        return " ".join(parts) or "TP1"


@dataclass(frozen=True, slots=True)
class LlamaSpec:
    """One model's recipe defaults (Megatron Bridge's published values for it)."""

    name: str
    """Recipe prefix and module name, e.g. ``llama3_8b``."""
    hf_id: str
    """Hub id of the model whose config.json is shipped (``hf_configs/<repo name>.json``)."""
    pretrain: Parallelism
    pretrain_seq_length: int
    sft: Parallelism
    sft_global_batch_size: int
    peft: Parallelism
    peft_global_batch_size: int
    lora_dim: int
    lora_alpha: int
    lora_targets: tuple[str, ...] = ALL_LINEAR
    dora_alpha: int | None = None
    """DoRA's alpha when it differs from ``lora_alpha`` (3.2 1B / 3B: Megatron Bridge's DoRA defaults, 32 / 64)."""
    finetune_seq_length: int = 4096
    pipeline_split_counts_embedding_and_loss: bool = False
    """405B: the embedding and the loss each count as a layer when layers are split over pipeline stages."""

    @property
    def display_name(self) -> str:
        return self.hf_id.split("/", 1)[1]

    def hf_config(self) -> dict[str, Any]:
        """A fresh copy of the model's HF config.json."""
        return hf_config(self.display_name)


@functools.cache
def _load(name: str) -> dict[str, Any]:
    text = resources.files(__package__).joinpath("hf_configs", f"{name}.json").read_text()
    return json.loads(text)


def hf_config(name: str) -> dict[str, Any]:
    """The shipped HF config.json of ``name`` (``Llama-3.2-1B``, ``Meta-Llama-3-8B``, ...), as a fresh dict.

    Raises:
        KeyError: for a model that is not shipped; the message lists those that are.
    """
    known = sorted(spec.display_name for spec in SPECS.values())
    if name not in known:
        raise KeyError(f"no shipped HF config for {name!r}; known: {', '.join(known)}")
    return copy.deepcopy(_load(name))


_SMALL_SFT = Parallelism()
_8B_SFT = Parallelism(tp=2)
_70B_SFT = Parallelism(tp=8, pp=4)
_70B_PEFT = Parallelism(tp=8)
_70B_PRETRAIN = Parallelism(tp=4, pp=4, vp=5, cp=2, sp=True)

SPECS: dict[str, LlamaSpec] = {spec.name: spec for spec in (
    LlamaSpec(name="llama32_1b", hf_id="meta-llama/Llama-3.2-1B", pretrain=Parallelism(), pretrain_seq_length=8192,
              sft=_SMALL_SFT, sft_global_batch_size=8, peft=Parallelism(), peft_global_batch_size=8,
              lora_dim=32, lora_alpha=32, dora_alpha=64),
    LlamaSpec(name="llama32_3b", hf_id="meta-llama/Llama-3.2-3B", pretrain=Parallelism(), pretrain_seq_length=8192,
              sft=_SMALL_SFT, sft_global_batch_size=8, peft=Parallelism(), peft_global_batch_size=8,
              lora_dim=32, lora_alpha=32, dora_alpha=64),
    LlamaSpec(name="llama3_8b", hf_id="meta-llama/Meta-Llama-3-8B", pretrain=Parallelism(cp=2),
              pretrain_seq_length=8192, sft=_8B_SFT, sft_global_batch_size=8, peft=Parallelism(),
              peft_global_batch_size=8, lora_dim=8, lora_alpha=16),
    LlamaSpec(name="llama3_70b", hf_id="meta-llama/Meta-Llama-3-70B", pretrain=_70B_PRETRAIN,
              pretrain_seq_length=8192, sft=_70B_SFT, sft_global_batch_size=8, peft=_70B_PEFT,
              peft_global_batch_size=8, lora_dim=16, lora_alpha=32),
    LlamaSpec(name="llama31_8b", hf_id="meta-llama/Llama-3.1-8B", pretrain=Parallelism(cp=2),
              pretrain_seq_length=8192, sft=_8B_SFT, sft_global_batch_size=8, peft=Parallelism(),
              peft_global_batch_size=8, lora_dim=8, lora_alpha=16),
    LlamaSpec(name="llama31_70b", hf_id="meta-llama/Llama-3.1-70B", pretrain=_70B_PRETRAIN,
              pretrain_seq_length=131072, sft=_70B_SFT, sft_global_batch_size=8, peft=_70B_PEFT,
              peft_global_batch_size=8, lora_dim=16, lora_alpha=32),
    LlamaSpec(name="llama31_405b", hf_id="meta-llama/Llama-3.1-405B",
              pretrain=Parallelism(tp=8, pp=8, vp=2, cp=4, sp=True), pretrain_seq_length=131072,
              sft=Parallelism(tp=8, pp=16, sp=True), sft_global_batch_size=16,
              peft=Parallelism(tp=4, pp=8, vp=8, sp=True), peft_global_batch_size=32,
              lora_dim=16, lora_alpha=32, lora_targets=("linear_qkv",), finetune_seq_length=2048,
              pipeline_split_counts_embedding_and_loss=True),
)}
"""Every model, by recipe prefix."""
