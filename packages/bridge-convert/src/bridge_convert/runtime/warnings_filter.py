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
)


def silence_known_warnings() -> None:
    """Hide import-time notices that say nothing actionable (fallbacks to torch kernels, deprecations inside
    megatron-core); every other warning still shows."""
    for message in _KNOWN:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    warnings.filterwarnings("ignore", category=SyntaxWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=SyntaxWarning)  # compile-time warnings carry no module
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
