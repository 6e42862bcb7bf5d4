"""Silence the warnings megatron-core and torch print on every import of a CPU or TE-less install.

For command-line entry points only (a library must not change a process's warning filters on import).
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["silence_known_warnings"]

_KNOWN = (
    r"Transformer Engine and Apex are not installed.*",
    r"Apex is not installed.*",
    r"full scope is deprecated.*",
    r".* is experimental and still under active development.*",
    r"torch.distributed is disabled, unavailable or uninitialized.*",  # DCP, inside dist-checkpoint loads
    r"The argument order of load has been changed.*",
)
_KNOWN_FUTURE = (r"Please use DTensor instead and we are deprecating ShardedTensor.*",)
_KNOWN_LOGS = (
    "MCore's async save is deprecated",  # logged on every synchronous save too
    "Unable to save RandomMockGPTDataset indexes because path_to_cache is None",
)


class _DropKnownLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(known in message for known in _KNOWN_LOGS)


def silence_known_warnings() -> None:
    """Hide import-time notices that say nothing actionable (fallbacks to torch kernels, deprecations inside
    megatron-core); every other warning still shows."""
    for message in _KNOWN:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    warnings.filterwarnings("ignore", category=SyntaxWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=SyntaxWarning)  # compile-time warnings carry no module
    for message in _KNOWN_FUTURE:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    drop = _DropKnownLogs()
    for handler in logging.getLogger().handlers:
        handler.addFilter(drop)
    for name in ("megatron.core.dist_checkpointing.strategies.torch",
                 "megatron.core.datasets.gpt_dataset", "megatron.core.datasets.blended_megatron_dataset_builder"):
        logging.getLogger(name).addFilter(drop)
