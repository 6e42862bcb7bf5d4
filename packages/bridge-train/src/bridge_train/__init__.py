"""bridge-train: ConfigContainer and the pretrain / finetune loop on megatron-core."""

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

__all__ = [
    "CheckpointConfig",
    "ConfigContainer",
    "ConfigError",
    "DDPConfig",
    "LoggerConfig",
    "MixedPrecisionConfig",
    "OptimizerConfig",
    "ProfilingConfig",
    "RNGConfig",
    "RobustnessConfig",
    "SchedulerConfig",
    "TrainConfig",
    "apply_overrides",
    "get_mixed_precision_config",
]
