"""Process groups, megatron-core parallel state and the CPU compatibility layer.

Public entry points (``to_megatron_model``, ``pretrain``) call :func:`initialize_parallel`; users never need to.
"""

from ._cpu_compat import CPU_PATCHES, applied_patches, apply_cpu_compat, cpu_compat, remove_cpu_compat
from .parallel import (
    ParallelLayout,
    ParallelState,
    destroy_parallel,
    get_parallel_state,
    initialize_parallel,
    log_rank0,
    parallel_runtime,
)
from .warnings_filter import silence_known_warnings

__all__ = [
    "CPU_PATCHES",
    "ParallelLayout",
    "ParallelState",
    "applied_patches",
    "apply_cpu_compat",
    "cpu_compat",
    "destroy_parallel",
    "get_parallel_state",
    "initialize_parallel",
    "log_rank0",
    "parallel_runtime",
    "remove_cpu_compat",
    "silence_known_warnings",
]
