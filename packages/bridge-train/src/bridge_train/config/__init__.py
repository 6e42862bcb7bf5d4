"""bridge-train's configuration: :class:`ConfigContainer`, its sub-configs, mixed-precision recipes, YAML and
dotted overrides. See the package README for every field and the override grammar.

Names are imported lazily: ``import bridge_train.config`` imports neither torch nor megatron-core; the sections
built on megatron-core's own configs (the container, DDP, optimizer) import it when first used.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CheckpointConfig": ".checkpoint",
    "ConfigContainer": ".container",
    "DDPConfig": ".ddp",
    "ConfigError": ".errors",
    "ConfigWarning": ".errors",
    "LoggerConfig": ".logger",
    "MIXED_PRECISION_RECIPES": ".mixed_precision",
    "MixedPrecisionConfig": ".mixed_precision",
    "get_mixed_precision_config": ".mixed_precision",
    "OptimizerConfig": ".optimizer",
    "SchedulerConfig": ".optimizer",
    "apply_cli_args": ".overrides",
    "apply_overrides": ".overrides",
    "parse_cli_args": ".overrides",
    "ProfilingConfig": ".profiling",
    "DatasetConfigLike": ".protocols",
    "PeftLike": ".protocols",
    "TokenizerConfigLike": ".protocols",
    "RNGConfig": ".train",
    "RobustnessConfig": ".train",
    "TrainConfig": ".train",
}

__all__ = [
    "CheckpointConfig",
    "ConfigContainer",
    "ConfigError",
    "ConfigWarning",
    "DDPConfig",
    "DatasetConfigLike",
    "LoggerConfig",
    "MIXED_PRECISION_RECIPES",
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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
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
