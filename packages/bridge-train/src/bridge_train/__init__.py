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
from .entrypoints import finetune, pretrain
from .forward_step import gpt_forward_step

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
    "finetune",
    "gpt_forward_step",
    "get_mixed_precision_config",
    "pretrain",
]
