"""ConfigContainer: every setting of a training run, as small sub-configs the loop reads directly.

Two phases. Build and edit freely (in Python, from YAML, with dotted overrides), then call
:meth:`ConfigContainer.finalize` once at the entrypoint: it applies the mixed-precision recipe, lets each
sub-config check itself, checks how they relate (batch sizes against the data-parallel size, heads and layers
against TP/PP/VP/CP, precision flags across model/optimizer/DDP, FP8/FP4 support on this machine, ...), and raises
one :class:`ConfigError` listing every problem before anything is built. :meth:`validate` does the same dry run
without changing the config.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pathlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from megatron.core.transformer import TransformerConfig

from bridge_convert.provider import GPTModelProvider

from . import invariants, yaml_io
from .checkpoint import CheckpointConfig
from .ddp import DDPConfig
from .errors import ConfigError, ConfigWarning
from .fields import NotRestorable, build, type_problems
from .logger import LoggerConfig
from .mixed_precision import MixedPrecisionConfig, get_mixed_precision_config
from .optimizer import OptimizerConfig, SchedulerConfig
from .profiling import ProfilingConfig
from .protocols import DatasetConfigLike, PeftLike, TokenizerConfigLike, peft_method
from .train import RNGConfig, RobustnessConfig, TrainConfig

__all__ = ["ConfigContainer", "section_copy"]

# Sub-configs with a check(prefix) method, in the order their problems are listed.
_CHECKED_SECTIONS = {
    "train": TrainConfig, "optimizer": OptimizerConfig, "scheduler": SchedulerConfig, "ddp": DDPConfig,
    "checkpoint": CheckpointConfig, "logger": LoggerConfig, "rng": RNGConfig, "profiling": ProfilingConfig,
    "robustness": RobustnessConfig,
}
# Sub-configs that finalize() may change in place; validate() works on copies of these.
_MUTABLE_SECTIONS = ("model", "train", "optimizer", "scheduler", "ddp", "mixed_precision", "dataset", "tokenizer")


@dataclass(kw_only=True, slots=True)
class ConfigContainer:
    """Everything a pretrain / finetune run needs; see the package README for every field."""

    model: GPTModelProvider
    """The model provider (a megatron-core TransformerConfig that builds the model): shape, parallel layout."""
    train: TrainConfig
    """Batch sizes, iterations, evaluation cadence and exit conditions."""
    dataset: DatasetConfigLike | None = None
    """Dataset config with ``build(tokenizer, ...)`` (bridge-data's mock / pretrain / SFT configs); required."""
    tokenizer: TokenizerConfigLike | None = None
    """Tokenizer config (bridge-data's TokenizerConfig); None when the dataset needs none."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """megatron-core optimizer settings (Adam/SGD, lr, weight decay, clipping, distributed optimizer)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate and weight-decay schedule."""
    ddp: DDPConfig = field(default_factory=DDPConfig)
    """megatron-core data-parallel settings (gradient reduction, overlap, distributed optimizer buffers)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming and fine-tuning from a checkpoint."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Console, TensorBoard and W&B logging."""
    rng: RNGConfig = field(default_factory=RNGConfig)
    """Seeds."""
    mixed_precision: MixedPrecisionConfig | str | None = None
    """A recipe name (``bf16_mixed``, ``bf16-with-fp8-delayed-scaling-mixed``, ...) or a MixedPrecisionConfig,
    applied to model, optimizer and ddp at finalize(); None leaves their precision fields as they are."""
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    """torch.profiler and memory-snapshot settings."""
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    """NaN/Inf policy and exit signals."""
    peft: PeftLike | None = None
    """Optional PEFT method, called as ``peft(model, training) -> model``; a registered name in YAML and overrides
    (``peft=lora``); a dataclass one round-trips through YAML, another is saved by class path and repr only."""
    _finalized: bool = field(default=False, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------------------------------ phases
    def validate(self, world_size: int | None = None) -> None:
        """Check the whole config as :meth:`finalize` would, without changing it.

        Args:
            world_size: Number of processes of the run; None skips the checks that need it (data-parallel size
                is taken as 1).

        Raises:
            ConfigError: listing every problem, each with the dotted field name and the fix.
        """
        problems = self._working_copy()._resolve(world_size)
        if problems:
            raise ConfigError(problems)

    def finalize(self, world_size: int | None = None) -> ConfigContainer:
        """Validate, then apply mixed precision and derive fields in place; idempotent.

        Derived: the mixed-precision recipe (a name becomes its MixedPrecisionConfig, its fields land on model,
        optimizer and ddp), ``train.global_batch_size`` (None -> micro x DP), ``optimizer.min_lr`` (None -> 0),
        the scheduler's iteration counts and weight decays, and the model/optimizer/DDP configs' own derived fields.

        Raises:
            ConfigError: as :meth:`validate`; nothing has been changed then.
        """
        if self._finalized:
            return self
        self.validate(world_size)
        problems = self._resolve(world_size)
        if problems:  # validate() ran the same steps on a copy; a difference is a bug, reported all the same
            raise ConfigError(problems)
        self._finalized = True
        return self

    @property
    def finalized(self) -> bool:
        """True after :meth:`finalize` succeeded."""
        return self._finalized

    def data_parallel_size(self, world_size: int | None) -> int:
        """Data-parallel size for ``world_size`` processes: ``world_size / (TP x PP x CP)``; 1 when None."""
        return invariants.data_parallel_size(self.model, world_size)

    def num_microbatches(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (gradient-accumulation steps)."""
        dp = self.data_parallel_size(world_size)
        global_batch = self.train.global_batch_size or self.train.micro_batch_size * dp
        return global_batch // (self.train.micro_batch_size * dp)

    # ------------------------------------------------------------------------------------------- YAML
    def to_dict(self) -> dict[str, Any]:
        """Plain data (what :meth:`to_yaml` writes)."""
        return yaml_io.to_dict(self)

    def to_yaml(self, path: str | pathlib.Path | None = None) -> str:
        """The config as YAML (also written to ``path`` when given); :meth:`from_yaml` reads it back."""
        return yaml_io.to_yaml(self, path)

    @classmethod
    def from_yaml(cls, source: str | pathlib.Path) -> ConfigContainer:
        """Build a config from YAML text or a file written by :meth:`to_yaml` (or by hand).

        Raises:
            ConfigError: for invalid YAML, unknown keys (with the closest valid key), values that do not fit
                their field's type, and missing required fields.
        """
        return cls.from_dict(yaml_io.read_yaml(source))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfigContainer:
        """Build a config from plain data (the inverse of :meth:`to_dict`); ``peft`` may be a registered name.

        Raises:
            ConfigError: listing every unknown key, bad value and missing field.
        """
        data = dict(data)
        if isinstance(data.get("peft"), str):
            try:
                data["peft"] = peft_method(data["peft"])
            except ValueError as err:
                raise ConfigError([f"peft: {err}"], "cannot build config from YAML") from None
        try:
            cfg = build(cls, data)
        except ConfigError as err:
            raise ConfigError(err.problems, "cannot build config from YAML") from None
        for name in ("dataset", "tokenizer", "peft"):
            value = getattr(cfg, name)
            if isinstance(value, NotRestorable):
                warnings.warn(f"{name} ({value.target}: {value.repr}) was saved by class path and repr only and is "
                              f"not restored; set cfg.{name} in Python", ConfigWarning, stacklevel=3)
                setattr(cfg, name, None)
        return cfg

    # -------------------------------------------------------------------------------------- internals
    def _working_copy(self, names: Iterable[str] = _MUTABLE_SECTIONS) -> ConfigContainer:
        """A copy for a dry run whose sections ``names`` are deep copies (see :func:`section_copy`)."""
        clone = copy.copy(self)
        for name in names:
            try:
                setattr(clone, name, section_copy(getattr(self, name)))
            except (TypeError, copy.Error, RecursionError):  # e.g. a PEFT object holding a lock: shared
                continue
        return clone

    def _resolve(self, world_size: int | None) -> list[str]:
        """Apply mixed precision, check everything, derive fields; changes ``self``. Returns the problems."""
        if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)
                                       or world_size < 1):
            return [f"world_size must be a positive integer, got {world_size!r}"]
        problems = [f"{name} must be a {cls.__module__}.{cls.__qualname__}, got {type(getattr(self, name)).__name__}"
                    for name, cls in _CHECKED_SECTIONS.items() if not isinstance(getattr(self, name), cls)]
        if not isinstance(self.model, TransformerConfig) or not callable(getattr(self.model, "provide", None)):
            problems.append(f"model must be a model provider (e.g. bridge_convert's GPTModelProvider), got "
                            f"{type(self.model).__name__}")
        # One type pass over every section (the same schema that reads YAML and overrides); the rules below may
        # then compare and do arithmetic on any field: an exception from a rule is a bug in the rule.
        problems = problems or [message for name in (*_CHECKED_SECTIONS, "model", "mixed_precision")
                                if dataclasses.is_dataclass(getattr(self, name))
                                for message in type_problems(getattr(self, name), name)]
        if problems:
            return problems
        mixed_precision, problems = self._resolve_mixed_precision()
        for name in _CHECKED_SECTIONS:
            problems += getattr(self, name).check(name)
        problems += [
            *invariants.model_layout_problems(self.model, world_size),
            *invariants.batch_problems(self.train, self.model, world_size),
            *invariants.precision_problems(self.model, self.optimizer, self.ddp, mixed_precision),
            *invariants.optimizer_ddp_problems(self.optimizer, self.ddp),
            *invariants.schedule_problems(self.scheduler, self.optimizer, self.train),
            *invariants.run_problems(self, world_size),
        ]
        if problems:
            return problems
        if self.train.global_batch_size is None:
            self.train.global_batch_size = self.train.micro_batch_size * self.data_parallel_size(world_size)
        self.scheduler.finalize(self.train.train_iters, self.optimizer.weight_decay)
        derived = frozenset(n for n in yaml_io.DERIVED_CALLABLES if getattr(self.model, n, None) is None)
        problems = [message for name in ("model", "optimizer", "ddp", "dataset", "tokenizer")
                    for message in _finalize_section(name, getattr(self, name))]
        self.model._derived_callables = derived  # what finalize() made: not saved (it is made again on load)
        return problems

    def _resolve_mixed_precision(self) -> tuple[MixedPrecisionConfig | None, list[str]]:
        value = self.mixed_precision
        if value is None:
            return None, []
        if isinstance(value, str):
            try:
                value = get_mixed_precision_config(value)
            except ValueError as err:
                return None, [f"mixed_precision: {err}"]
        if not isinstance(value, MixedPrecisionConfig):
            return None, [f"mixed_precision must be a recipe name or a MixedPrecisionConfig, got "
                          f"{type(value).__name__}"]
        problems = value.check("mixed_precision")
        if getattr(self.model, "_finalized", False):
            problems.append("model was finalized before the container, so mixed_precision cannot be applied to it; "
                            "assign an unfinalized provider (provider.replace() returns one)")
        if not problems:
            value.apply(self.model, self.optimizer, self.ddp)
            self.mixed_precision = value
        return value, problems


def section_copy(section: Any) -> Any:
    """A deep copy of a sub-config that shares its private attributes (``_pre_wrap_hooks`` may hold closures over
    loaded weights, which a dry run must not duplicate)."""
    memo = {id(value): value for name, value in getattr(section, "__dict__", {}).items() if name.startswith("_")}
    return copy.deepcopy(section, memo)


def _finalize_section(name: str, section: Any) -> list[str]:
    """Run a sub-config's own finalize(); its exceptions become problems named after the section."""
    method = getattr(section, "finalize", None)
    try:
        inspect.signature(method).bind()
    except TypeError:  # no finalize, or one that needs arguments (the loop's to call)
        return []
    try:
        method()
    except (ValueError, AssertionError, TypeError, RuntimeError, OSError) as err:  # OSError: its files
        return [f"{name}: {err}"]
    return []
