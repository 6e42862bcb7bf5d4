"""Where and how often checkpoints are written, and what is loaded at start."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .fields import at_least

__all__ = ["CheckpointConfig"]


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Saving (dist-checkpointing, keep-last-N, async, optional HF export) and loading (resume or fine-tune)."""

    save: str | None = None
    """Directory for checkpoints (``iter_0000010/`` folders and a ``latest`` tracker); None: never save."""
    save_interval: int | None = None
    """Save every this many iterations (and at exit); None: save only at the end and on exit signals."""
    keep_last_n: int | None = None
    """Delete older checkpoints so that this many remain; None: keep all."""
    async_save: bool = False
    """Write checkpoints in the background while training continues (megatron-core's asynchronous
    dist-checkpoint save); a checkpoint becomes the latest only once its files are complete on every rank."""
    fully_parallel_save: bool = True
    """Spread the writing of replicated tensors over the data-parallel ranks."""
    save_optim: bool = True
    """Include the optimizer state in checkpoints (the learning-rate schedule's position is always saved)."""
    save_rng: bool = True
    """Include the RNG states in checkpoints (needed for bitwise-exact resume)."""
    save_hf: bool = False
    """Also export a Hugging Face checkpoint (via bridge-convert) into each saved checkpoint (``iter_N/hf``); for a
    PEFT run its adapters in the HF PEFT format (``iter_N/hf_adapter``)."""
    load: str | None = None
    """Directory to resume from (its ``latest`` complete checkpoint); None: start fresh."""
    load_optim: bool = True
    """Restore the optimizer state when resuming (the learning-rate schedule always continues from the checkpoint's
    position)."""
    load_rng: bool = True
    """Restore the RNG states when resuming."""
    fallback_to_previous: bool = False
    """If the checkpoint to resume from is damaged (a truncated or missing file): resume from the previous complete
    checkpoint instead of stopping (the damaged directory is renamed ``iter_N.damaged``)."""
    exit_on_missing_checkpoint: bool = False
    """If ``load`` holds no checkpoint: raise instead of starting from scratch."""
    finetune: bool = False
    """This run needs weights: ``pretrained_checkpoint``, or a checkpoint of this run in ``load`` to resume (refused
    at start without either, instead of training random weights)."""
    pretrained_checkpoint: str | None = None
    """Megatron or HF checkpoint directory whose model weights the run starts from, at iteration 0 with a fresh
    optimizer (``pretrain`` and ``finetune`` alike), when ``load`` holds no checkpoint of this run to resume."""

    def check(self, prefix: str = "checkpoint") -> list[str]:
        """Problems with this config alone (its values have the declared types: the container checked them)."""
        problems = at_least(self, prefix, save_interval=1, keep_last_n=1)
        if self.save is None:
            for name in ("save_interval", "keep_last_n"):
                if getattr(self, name) is not None:
                    problems.append(f"{prefix}.{name} is set but {prefix}.save is not; set {prefix}.save to a "
                                    f"directory, or {prefix}.{name}=null")
            for name in ("async_save", "save_hf"):
                if getattr(self, name):
                    problems.append(f"{prefix}.{name} is true but {prefix}.save is not set; set {prefix}.save to "
                                    f"a directory, or {prefix}.{name}=false")
        if self.finetune and not self.pretrained_checkpoint and not self.load:
            problems.append(f"{prefix}.finetune is true but neither {prefix}.pretrained_checkpoint nor "
                            f"{prefix}.load is set; point {prefix}.pretrained_checkpoint at the weights to fine-tune")
        problems += [f"{prefix}.{name} is true but {prefix}.load is not set" for name in
                     ("exit_on_missing_checkpoint", "fallback_to_previous") if getattr(self, name) and not self.load]
        return problems + self._path_problems(prefix)

    def _path_problems(self, prefix: str) -> list[str]:
        """Checkpoint paths that cannot be meant (read-only looks at the disk, before anything is built)."""
        from bridge_convert.megatron_ckpt import adapter_checkpoint_message

        from ..checkpoint_discovery import hf_model_directory_problem

        problems = []
        if self.pretrained_checkpoint and not os.path.exists(self.pretrained_checkpoint):
            problems.append(f"{prefix}.pretrained_checkpoint={self.pretrained_checkpoint} does not exist; point it at "
                            "an HF model directory or a Megatron checkpoint")
        elif self.pretrained_checkpoint and (adapters := adapter_checkpoint_message(self.pretrained_checkpoint)):
            problems.append(f"{prefix}.pretrained_checkpoint: {adapters}")  # it was found after the model was built
        if self.load and os.path.isfile(self.load):
            problems.append(f"{prefix}.load={self.load} is a file; point it at the checkpoint.save directory of the "
                            "run to resume, or at one of its iter_* directories")
        hf_load = hf_model_directory_problem(self.load) if self.load else None
        return problems + ([hf_load] if hf_load else [])
