"""bridge-train: ConfigContainer and the pretrain / finetune loop on megatron-core.

Names are imported lazily: ``import bridge_train`` does not import torch or megatron-core until one is used
(``bridge_train.config`` and the ``--help`` of a CLI built on it start in about a second).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_CONFIG_NAMES = (
    "CheckpointConfig", "ConfigContainer", "ConfigError", "DDPConfig", "LoggerConfig", "MixedPrecisionConfig",
    "OptimizerConfig", "ProfilingConfig", "RNGConfig", "RobustnessConfig", "SchedulerConfig", "TrainConfig",
    "apply_overrides", "get_mixed_precision_config",
)
_EXPORTS = {
    **dict.fromkeys(_CONFIG_NAMES, ".config"),
    "finetune": ".entrypoints",
    "pretrain": ".entrypoints",
    "user_errors_exit": ".entrypoints",
    "gpt_forward_step": ".forward_step",
    "CheckpointError": ".checkpoint_discovery",
    "MissingCheckpointError": ".checkpoint_discovery",
}

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "ConfigContainer",
    "ConfigError",
    "DDPConfig",
    "LoggerConfig",
    "MissingCheckpointError",
    "MixedPrecisionConfig",
    "OptimizerConfig",
    "ProfilingConfig",
    "RNGConfig",
    "RobustnessConfig",
    "SchedulerConfig",
    "TrainConfig",
    "apply_overrides",
    "finetune",
    "get_mixed_precision_config",
    "gpt_forward_step",
    "pretrain",
    "user_errors_exit",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Like bridge_convert's names: hide megatron-core's known-harmless import-time warnings before it is imported
    # (BRIDGE_SHOW_WARNINGS=1 shows them; bridge_convert/runtime/warnings_filter.py).
    from bridge_convert.runtime.warnings_filter import silence_known_warnings

    silence_known_warnings()
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .checkpoint_discovery import CheckpointError, MissingCheckpointError
    from .config import (
        CheckpointConfig,
        ConfigContainer,
        ConfigError,
        DDPConfig,
        LoggerConfig,
        MixedPrecisionConfig,
        OptimizerConfig,
        ProfilingConfig,
        RNGConfig,
        RobustnessConfig,
        SchedulerConfig,
        TrainConfig,
        apply_overrides,
        get_mixed_precision_config,
    )
    from .entrypoints import finetune, pretrain, user_errors_exit
    from .forward_step import gpt_forward_step
