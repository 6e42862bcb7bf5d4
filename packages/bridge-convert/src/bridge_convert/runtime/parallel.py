"""torch.distributed + megatron-core parallel state, on GPU (NCCL) or CPU (gloo).

This is the only module of the workspace that calls ``init_process_group`` or reads ``RANK`` / ``WORLD_SIZE``.
Everything else asks the :class:`ParallelState` it returns for ranks, sizes and groups.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from ._cpu_compat import applied_patches, apply_cpu_compat, remove_cpu_compat

__all__ = [
    "ParallelLayout",
    "ParallelState",
    "destroy_parallel",
    "get_parallel_state",
    "initialize_parallel",
    "log_rank0",
    "parallel_runtime",
]

logger = logging.getLogger("bridge")


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelLayout:
    """How the world is split. Field names are megatron-core's TransformerConfig names.

    The data-parallel size is what is left: ``world_size / (TP * PP * CP)``.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_config(cls, config) -> ParallelLayout:
        """Read the layout off any object with TransformerConfig-style fields (a provider, a config)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


class ParallelState:
    """The process's view of the parallel world: ranks, sizes, groups and the device to compute on."""

    def __init__(self, layout: ParallelLayout, backend: str, device: torch.device) -> None:
        self.layout = layout
        self.backend = backend
        self.device = device

    # Whole world.
    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    # Tensor parallel.
    @property
    def tp_rank(self) -> int:
        return _mpu().get_tensor_model_parallel_rank()

    @property
    def tp_size(self) -> int:
        return _mpu().get_tensor_model_parallel_world_size()

    @property
    def tp_group(self):
        return _mpu().get_tensor_model_parallel_group()

    # Pipeline parallel.
    @property
    def pp_rank(self) -> int:
        return _mpu().get_pipeline_model_parallel_rank()

    @property
    def pp_size(self) -> int:
        return _mpu().get_pipeline_model_parallel_world_size()

    @property
    def pp_group(self):
        return _mpu().get_pipeline_model_parallel_group()

    @property
    def vp_size(self) -> int | None:
        return self.layout.virtual_pipeline_model_parallel_size

    @property
    def is_first_pp_stage(self) -> bool:
        return _mpu().is_pipeline_first_stage(ignore_virtual=True)

    @property
    def is_last_pp_stage(self) -> bool:
        return _mpu().is_pipeline_last_stage(ignore_virtual=True)

    # Data parallel (with context parallel folded in, as megatron-core's DDP sees it).
    @property
    def dp_rank(self) -> int:
        return _mpu().get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return _mpu().get_data_parallel_world_size()

    def dp_group(self, with_context_parallel: bool = False):
        return _mpu().get_data_parallel_group(with_context_parallel=with_context_parallel)

    # Context parallel.
    @property
    def cp_rank(self) -> int:
        return _mpu().get_context_parallel_rank()

    @property
    def cp_size(self) -> int:
        return _mpu().get_context_parallel_world_size()

    def seed(self, seed: int, *, per_stage: bool = False, data_parallel_random_init: bool = False) -> None:
        """Seed Python's, NumPy's and torch's generators and megatron-core's model-parallel RNG tracker (which
        gives each TP rank its own stream for TP-split weights and dropout).

        Args:
            seed: the base seed.
            per_stage: megatron-LM's training seeding: each pipeline stage draws from its own stream
                (``seed + 100 * pp_rank``), so stages initialise different layers differently.
            data_parallel_random_init: with ``per_stage``, each data-parallel rank too (``+ 10 * dp_rank``).
        """
        import random

        import numpy as np
        from megatron.core import tensor_parallel

        if per_stage:
            seed += 100 * self.pp_rank + (10 * self.dp_rank if data_parallel_random_init else 0)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

    def barrier(self) -> None:
        dist.barrier()

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"pp={self.pp_rank}/{self.pp_size}, dp={self.dp_rank}/{self.dp_size}, device={self.device})")


_STATE: ParallelState | None = None
_OWNS_CPU_COMPAT = False


def _mpu():
    from megatron.core import parallel_state

    return parallel_state


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        # A plain `python script.py`: a world of one, rendezvous through an in-process store (no port needed).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def initialize_parallel(
    layout: ParallelLayout | None = None,
    *,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelState:
    """Initialise torch.distributed and megatron-core's parallel state for ``layout``; idempotent.

    Works under ``torchrun`` (reads RANK / WORLD_SIZE / LOCAL_RANK), inside a process group that the caller
    already made, and in a plain single process (world size 1). Uses NCCL when CUDA is available, otherwise
    gloo plus the CPU compatibility patches megatron-core needs. Calling it again with the same layout returns
    the existing state; a different layout rebuilds megatron-core's groups over the same processes.

    Raises:
        ValueError: if the world size is not divisible by TP x PP x CP.
    """
    global _STATE, _OWNS_CPU_COMPAT
    layout = layout or ParallelLayout()
    cuda = torch.cuda.is_available()
    if not cuda and not applied_patches():
        apply_cpu_compat()
        _OWNS_CPU_COMPAT = True  # removed by destroy_parallel (unless a caller's cpu_compat() block holds them)
    backend = "nccl" if cuda else "gloo"

    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        _init_process_group(backend, timeout_minutes)
    else:
        backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    if _STATE is not None and _STATE.layout == layout and _mpu().model_parallel_is_initialized():
        return _STATE

    world = dist.get_world_size()
    if world % layout.model_parallel_size:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size x pipeline_model_parallel_size x "
            f"context_parallel_size = {layout.tensor_model_parallel_size} x {layout.pipeline_model_parallel_size}"
            f" x {layout.context_parallel_size}; launch a multiple of {layout.model_parallel_size} processes "
            f"(torchrun --nproc-per-node={layout.model_parallel_size} ...) or lower the parallel sizes"
        )
    mpu = _mpu()
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    _STATE = ParallelState(layout, backend, device)
    _STATE.seed(seed)
    return _STATE


def get_parallel_state() -> ParallelState:
    """The state made by :func:`initialize_parallel`.

    Raises:
        RuntimeError: if the runtime was not initialised in this process.
    """
    if _STATE is None or not _mpu().model_parallel_is_initialized():
        raise RuntimeError("parallel state is not initialised; call bridge_convert.runtime.initialize_parallel()")
    return _STATE


def destroy_parallel() -> None:
    """Tear down megatron-core's groups, the default process group and the CPU compatibility patches (for
    tests and clean exits); afterwards torch and megatron-core are as they were before the runtime started."""
    global _STATE, _OWNS_CPU_COMPAT
    try:
        # megatron-core's groups exist only if its parallel_state was imported: an offline conversion (CLI) never
        # does, and importing it here just to find nothing would cost its ~14 s import at exit.
        if "megatron.core.parallel_state" in sys.modules:
            mpu = _mpu()
            if mpu.model_parallel_is_initialized():
                mpu.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        _STATE = None
        if _OWNS_CPU_COMPAT:
            remove_cpu_compat()
            _OWNS_CPU_COMPAT = False


@contextmanager
def parallel_runtime(layout: ParallelLayout | None = None, *, seed: int = 1234,
                     timeout_minutes: int = 30) -> Iterator[ParallelState]:
    """:func:`initialize_parallel` for a ``with`` block, :func:`destroy_parallel` at its end.

    ```python
    with parallel_runtime(ParallelLayout(tensor_model_parallel_size=2)) as state:
        model = bridge.to_megatron_model(tensor_model_parallel_size=2)
    ```
    """
    state = initialize_parallel(layout, seed=seed, timeout_minutes=timeout_minutes)
    try:
        yield state
    finally:
        destroy_parallel()


def log_rank0(message: str, *args, level: int = logging.INFO) -> None:
    """Log once per job (global rank 0, or always before torch.distributed exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.log(level, message, *args)
