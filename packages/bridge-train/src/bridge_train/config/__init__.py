"""bridge-train's configuration: :class:`ConfigContainer`, its sub-configs, mixed-precision recipes, YAML and
dotted overrides. See the package README for every field and the override grammar."""

from .checkpoint import CheckpointConfig
from .container import ConfigContainer
from .ddp import DDPConfig
from .errors import ConfigError, ConfigWarning
from .logger import LoggerConfig
from .mixed_precision import MIXED_PRECISION_RECIPES, MixedPrecisionConfig, get_mixed_precision_config
from .optimizer import OptimizerConfig, SchedulerConfig
from .overrides import apply_cli_args, apply_overrides, parse_cli_args
from .profiling import ProfilingConfig
from .protocols import DatasetConfigLike, PeftLike, TokenizerConfigLike
from .train import RNGConfig, RobustnessConfig, TrainConfig

__all__ = [
    "MIXED_PRECISION_RECIPES",
    "CheckpointConfig",
    "ConfigContainer",
    "ConfigError",
    "ConfigWarning",
    "DDPConfig",
    "DatasetConfigLike",
    "LoggerConfig",
    "MixedPrecisionConfig",
    "OptimizerConfig",
    "PeftLike",
    "ProfilingConfig",
    "RNGConfig",
    "RobustnessConfig",
    "SchedulerConfig",
    "TokenizerConfigLike",
    "TrainConfig",
    "apply_cli_args",
    "apply_overrides",
    "get_mixed_precision_config",
    "parse_cli_args",
]
