"""bridge-train's configuration: :class:`ConfigContainer`, its sub-configs, mixed-precision recipes, YAML and
dotted overrides. See the package README for every field and the override grammar.

Names load on first use (PEP 562), so ``import bridge_train.config`` costs nothing; the model, optimizer and DDP
configs are megatron-core's, and touching ``ConfigContainer`` imports megatron-core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointConfig": "checkpoint", "ConfigContainer": "container", "DDPConfig": "ddp",
    "ConfigError": "errors", "ConfigWarning": "errors", "LoggerConfig": "logger",
    "MIXED_PRECISION_RECIPES": "mixed_precision", "MixedPrecisionConfig": "mixed_precision",
    "get_mixed_precision_config": "mixed_precision", "OptimizerConfig": "optimizer", "SchedulerConfig": "optimizer",
    "apply_cli_args": "overrides", "apply_overrides": "overrides", "parse_cli_args": "overrides",
    "peft_method": "protocols", "peft_method_names": "protocols", "register_peft_method": "protocols",
    "ProfilingConfig": "profiling", "DatasetConfigLike": "protocols", "PeftLike": "protocols",
    "TokenizerConfigLike": "protocols", "RNGConfig": "train", "RobustnessConfig": "train", "TrainConfig": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
