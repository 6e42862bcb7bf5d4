"""``pretrain(cfg, forward_step)`` and ``finetune(cfg, forward_step)``, and ``user_errors_exit`` for scripts.

Launch with ``torchrun --nproc-per-node=N script.py`` (or plain ``python script.py`` for one process, CPU included).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from bridge_convert.runtime.warnings_filter import silence_known_warnings

from .config import ConfigContainer
from .forward_step import gpt_forward_step
from .loop import TrainingResult, train
from .setup import setup_run

__all__ = ["finetune", "pretrain", "user_errors_exit"]


def pretrain(cfg: ConfigContainer, forward_step: Callable = gpt_forward_step) -> TrainingResult:
    """Train ``cfg.model`` on ``cfg.dataset`` from its initial (or imported) weights, resuming from
    ``cfg.checkpoint.load`` when it holds a checkpoint.

    ``forward_step`` is ``forward_step(data_iterator, model)`` or ``forward_step(state, data_iterator, model)``.

    Returns:
        A :class:`bridge_train.loop.TrainingResult`: the list of the loss of every iteration this call ran, with
        ``.model`` (the trained chunks, e.g. for ``bridge.save_hf_pretrained(result.model, out)``), ``.state``,
        ``.bridge`` and ``.exit_reason``.
    """
    silence_known_warnings()  # megatron-core's known-harmless notices; BRIDGE_SHOW_WARNINGS=1 shows them
    return train(setup_run(cfg, finetune=False), forward_step)


def finetune(cfg: ConfigContainer, forward_step: Callable = gpt_forward_step) -> TrainingResult:
    """Fine-tune pretrained weights: from ``cfg.checkpoint.pretrained_checkpoint`` (a Megatron or an HF
    checkpoint directory) or a provider made by ``AutoBridge.to_megatron_provider(load_weights=True)``; applies
    ``cfg.peft`` when set. Resumes from ``cfg.checkpoint.load`` when it holds a checkpoint of this run.

    Returns:
        A :class:`bridge_train.loop.TrainingResult`, as :func:`pretrain`.
    """
    silence_known_warnings()
    return train(setup_run(cfg, finetune=True), forward_step)


def _user_errors() -> tuple[type[BaseException], ...]:
    from bridge_convert.errors import CheckpointMismatchError

    from .checkpointing import CheckpointError
    from .config import ConfigError
    from .forward_step import ForwardStepSignatureError
    from .loop import NonFiniteLossError
    from .setup import TrainingDataExhaustedError

    return (ConfigError, CheckpointError, CheckpointMismatchError, NonFiniteLossError, ForwardStepSignatureError,
            TrainingDataExhaustedError)


@contextmanager
def user_errors_exit(debug: bool = False) -> Iterator[None]:
    """For the ``main`` of a training script: an error that the user's config, files or data cause
    (``ConfigError``, ``CheckpointError``, bridge-convert's ``CheckpointMismatchError``, ``NonFiniteLossError``,
    ``ForwardStepSignatureError``, ``TrainingDataExhaustedError``) is printed as its message alone
    (``error: ...`` on stderr by every process that raises it; ``[rank N] error: ...`` on ranks other than 0
    once the process group exists, as an error raised on some ranks only must be seen) and the process exits with
    status 1; with ``debug`` it propagates with its traceback. Any other exception (a bug) propagates unchanged.
    """
    try:
        yield
    except _user_errors() as exc:
        if debug:
            raise
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"{f'[rank {rank}] ' if rank else ''}error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
