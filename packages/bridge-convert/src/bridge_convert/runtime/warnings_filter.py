"""Hide the warnings megatron-core and torch print in every run that say nothing a user can act on.

One list, :data:`KNOWN_HARMLESS`: each entry is matched narrowly, by the start of its message *and* the module that
warns (for a ``warnings.warn``) or the logger that logs it, so that any other warning, from these modules too,
still shows. The public entry points (the ``bridge-convert`` CLI, importing ``AutoBridge``, bridge-train's
``pretrain`` / ``finetune``) call :func:`silence_known_warnings`; a library module must not change warning
filters by itself. Set ``BRIDGE_SHOW_WARNINGS=1`` to see them all.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

__all__ = ["KNOWN_HARMLESS", "SHOW_WARNINGS_ENV", "KnownWarning", "show_warnings_requested",
           "silence_known_warnings"]

SHOW_WARNINGS_ENV = "BRIDGE_SHOW_WARNINGS"


@dataclass(frozen=True, slots=True)
class KnownWarning:
    """A warning to hide: ``message`` (a regex matched at the start) from ``module`` (a regex matched against
    the whole module name of a ``warnings.warn`` caller, or the exact name of the logger that logs it)."""

    message: str
    module: str
    category: type[Warning] | None
    """The warning class; None for a log record."""

    why: str
    """Why it is harmless here."""


_MCORE_FALLBACK = "optional fused kernels; megatron-core uses its torch implementations, which this package expects"
KNOWN_HARMLESS: tuple[KnownWarning, ...] = (
    # Import of megatron.core without Transformer Engine / Apex (every CPU machine, most GPU dev installs).
    KnownWarning(r"Transformer Engine and Apex are not installed", r"megatron\.core\.optimizer(\.optimizer|"
                 r"\.clip_grads)?", UserWarning, _MCORE_FALLBACK),
    KnownWarning(r"Transformer Engine and Apex are not installed", r"(megatron\.core\.distributed\.fsdp\.src\.)?"
                 r"megatron_fsdp\.mixed_precision", UserWarning, _MCORE_FALLBACK),
    KnownWarning(r"Apex is not installed\. Falling back to Torch Norm", r"megatron\.core\.models\.[\w.]+",
                 UserWarning, "the specs this package builds use torch norms"),
    # Imported with megatron.core's parallel state when absl-py is absent (an install of bridge-convert alone).
    KnownWarning(r"absl\.logging is not installed", r"megatron\.core\.hyper_comm_grid", UserWarning,
                 "megatron-core then logs through the standard logging module, which is what this package reads"),
    # Compile-time notices in megatron-core's own sources (the warning's module is the file path there).
    KnownWarning(r"invalid escape sequence", r".*[/\\]megatron[/\\]core[/\\].*", SyntaxWarning,
                 "docstrings of megatron-core modules, printed once when they are first compiled"),
    # Every TransformerConfig: the default cuda_graph_modules="full" is deprecated, CUDA graphs on or off.
    KnownWarning(r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config", UserWarning,
                 "megatron-core's own default; this package never captures CUDA graphs through it"),
    # Imported by megatron-core's checkpointing and model registry; this package builds no MiMo model.
    KnownWarning(r"Mimo\w* is experimental and still under active development", r"megatron\.core\.models\.mimo"
                 r"\.[\w.]+", UserWarning, "the MiMo classes are only imported, never used"),
    # Dist checkpointing, on every save / load.
    KnownWarning(r"The argument order of load has been changed", r"torch\.distributed\.checkpoint\.logger",
                 UserWarning, "megatron-core calls DCP's load positionally, in an order DCP still accepts"),
    KnownWarning(r"MCore's async save is deprecated", "megatron.core.dist_checkpointing.strategies.torch", None,
                 "logged for the default strategy even when the save is synchronous"),
    KnownWarning(r"torch\.distributed is disabled, unavailable or uninitialized", r"torch\.distributed\.checkpoint"
                 r"\.[\w.]+", UserWarning, "DCP inside megatron-core's loads, which pass the process group"),
    KnownWarning(r"Please use DTensor instead and we are deprecating ShardedTensor", r"torch\.distributed\.[\w.]+",
                 FutureWarning, "megatron-core's torch_dist format is built on ShardedTensor"),
    # The distributed optimizer (every recipe's setting), once per run.
    KnownWarning(r"DistributedDataParallel: full_param_layout not provided",
                 "megatron.core.distributed.distributed_data_parallel", None,
                 "DDP computes the parameter layout itself with the distributed optimizer's own function, as it "
                 "would be passed in"),
    KnownWarning(r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
                 r"megatron\.core\.optimizer\.optimizer", UserWarning,
                 "zero_grad of the distributed optimizer's fp32 shards, which are views of the parameters: their "
                 ".grad is read, found None and left alone"),
    # Datasets: the mock dataset (and any dataset without cache_dir) has nowhere to cache its indexes.
    KnownWarning(r"Unable to save \w+ indexes because path_to_cache is None", "megatron.core.datasets.gpt_dataset",
                 None, "the indexes of mock data are rebuilt in milliseconds"),
    # torch's CUDA extension helper on a machine without the CUDA toolkit.
    KnownWarning(r"No CUDA runtime is found", "torch.utils.cpp_extension", None,
                 "nothing is compiled against CUDA on such a machine"),
)


class _DropKnownRecords(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


_installed = False


def show_warnings_requested() -> bool:
    """Whether ``BRIDGE_SHOW_WARNINGS`` asks to see the known-harmless warnings too."""
    return os.environ.get(SHOW_WARNINGS_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def silence_known_warnings() -> None:
    """Hide every :data:`KNOWN_HARMLESS` warning in this process (idempotent; a no-op with
    ``BRIDGE_SHOW_WARNINGS=1``). Every other warning still shows."""
    global _installed
    if _installed or show_warnings_requested():
        return
    by_logger: dict[str, list[re.Pattern]] = {}
    for known in KNOWN_HARMLESS:
        if known.category is None:
            by_logger.setdefault(known.module, []).append(re.compile(known.message))
        else:
            warnings.filterwarnings("ignore", message=known.message, category=known.category,
                                    module=known.module + r"\Z")
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropKnownRecords(patterns))
    _installed = True
