"""The warnings ``bridge-data preprocess`` hides by default: notices megatron-core prints when it is imported
on a machine without Transformer Engine / Apex (or without the CUDA toolkit), which say nothing a user can act on.

Each is matched by the start of its message and the module that warns; every other warning shows. Set
``BRIDGE_SHOW_WARNINGS=1`` to see these too. (bridge-convert keeps the list for model code and training; this
package does not depend on it.)
"""

from __future__ import annotations

import logging
import os
import re
import warnings

__all__ = ["silence_known_warnings"]

# (message regex, module regex, category): warnings.warn calls made while megatron.core is imported.
_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", r"megatron\.core\.optimizer(\.optimizer|\.clip_grads)?",
     UserWarning),
    (r"Transformer Engine and Apex are not installed",
     r"(megatron\.core\.distributed\.fsdp\.src\.)?megatron_fsdp\.mixed_precision", UserWarning),
    (r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core\.models\.[\w.]+", UserWarning),
    (r"invalid escape sequence", r".*[/\\]megatron[/\\]core[/\\].*", SyntaxWarning),  # compile time: file path
)
# (message regex, logger): torch's CUDA extension helper on a machine without the CUDA toolkit.
_LOGS = ((r"No CUDA runtime is found", "torch.utils.cpp_extension"),)

_installed = False


class _DropRecords(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence_known_warnings() -> None:
    """Hide the warnings above (idempotent; a no-op when ``BRIDGE_SHOW_WARNINGS`` is set to a true value)."""
    global _installed
    if _installed or os.environ.get("BRIDGE_SHOW_WARNINGS", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return
    for message, module, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module + r"\Z")
    for message, name in _LOGS:
        logging.getLogger(name).addFilter(_DropRecords(message))
    _installed = True
