"""bridge-train: ConfigContainer and the pretrain / finetune loop on megatron-core."""

from .checkpoint_discovery import CheckpointError
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

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
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
    "user_errors_exit",
]
