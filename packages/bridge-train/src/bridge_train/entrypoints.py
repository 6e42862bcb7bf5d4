"""``pretrain(cfg, forward_step)`` and ``finetune(cfg, forward_step)``.

Launch with ``torchrun --nproc-per-node=N script.py`` (or plain ``python script.py`` for one process, CPU included).
"""

from __future__ import annotations

from collections.abc import Callable

from bridge_convert.runtime.warnings_filter import silence_known_warnings

from .config import ConfigContainer
from .forward_step import gpt_forward_step
from .loop import train
from .setup import setup_run

__all__ = ["finetune", "pretrain"]


def pretrain(cfg: ConfigContainer, forward_step: Callable = gpt_forward_step) -> list[float]:
    """Train ``cfg.model`` on ``cfg.dataset`` from its initial (or imported) weights, resuming from
    ``cfg.checkpoint.load`` when it holds a checkpoint.

    Returns:
        The loss of every iteration this call ran.
    """
    silence_known_warnings()  # megatron-core's known-harmless notices; BRIDGE_SHOW_WARNINGS=1 shows them
    return train(setup_run(cfg, finetune=False), forward_step)


def finetune(cfg: ConfigContainer, forward_step: Callable = gpt_forward_step) -> list[float]:
    """Fine-tune pretrained weights: from ``cfg.checkpoint.pretrained_checkpoint`` (a Megatron or an HF
    checkpoint directory) or a provider made by ``AutoBridge.to_megatron_provider(load_weights=True)``; applies
    ``cfg.peft`` when set. Resumes from ``cfg.checkpoint.load`` when it holds a checkpoint of this run.

    Returns:
        The loss of every iteration this call ran.
    """
    silence_known_warnings()
    return train(setup_run(cfg, finetune=True), forward_step)
