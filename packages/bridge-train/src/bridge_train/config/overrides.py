"""Hydra-style dotted overrides and ``--config file.yaml`` merging onto a live :class:`ConfigContainer`.

OmegaConf parses the text (``OmegaConf.from_dotlist`` for ``key=value``, ``OmegaConf.load`` for files) and merges
the patches in order (files first, then overrides; later wins; interpolations such as ``${train.train_iters}`` are
resolved against the config as patched so far). Each value is then converted to the type its dataclass field declares
(:mod:`.coerce`). All overrides are checked before any is applied: one :class:`ConfigError` lists every unknown key
(with the closest valid key), every value that does not convert (key, value, expected type), and the override or
file it came from; on error the config is unchanged. Patches apply one after the other (not merged first), so a
later one edits the result of an earlier one.

Grammar: ``section.field=value``; ``+section.field=value`` and ``++section.field=value`` mean the same (every key
already exists, as dataclasses have fixed fields); values are YAML (``null``, ``true``, ``[1, 2]``,
``{k: v}``, quoted strings). Deleting a key (``~key``) is not supported: set it to ``null``.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
import warnings
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .coerce import REPR_KEY, TARGET_KEY, CoercionError, NotRestorable, coerce_field, field_type_hints
from .container import ConfigContainer, section_copy
from .errors import ConfigError, ConfigWarning
from .import_paths import import_object
from .mixed_precision import MixedPrecisionConfig, get_mixed_precision_config
from .suggest import unknown_key_message
from .yaml_io import container_to_dict, load_yaml

__all__ = ["apply_cli_args", "apply_overrides", "parse_cli_args"]

_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def apply_overrides(cfg: ConfigContainer, overrides: Sequence[str] = (), *,
                    config_files: Sequence[str | pathlib.Path] = ()) -> ConfigContainer:
    """Merge YAML files, then ``key=value`` overrides, into ``cfg`` (in place) with type conversion.

    Patches apply in order (files first, then overrides), each onto the result of the previous ones, so
    ``mixed_precision=bf16_mixed mixed_precision.grad_reduce_in_fp32=false`` edits the named recipe and an
    interpolation sees the values set before it.

    Args:
        cfg: The config to change; it must not be finalized yet.
        overrides: Dotted overrides, e.g. ``["train.train_iters=10", "optimizer.lr=3e-4",
            "model.params_dtype=bfloat16", "scheduler.lr_decay_style=cosine"]``.
        config_files: YAML files (whole or partial configs) merged before the overrides, in order.

    Returns:
        ``cfg``.

    Raises:
        ConfigError: listing every bad override or file entry; ``cfg`` is unchanged then.
    """
    if cfg.finalized:
        raise ConfigError(["the config is already finalized; apply overrides before finalize()"],
                          "cannot apply overrides")
    patches: list[tuple[str, DictConfig]] = []
    problems: list[str] = []
    for path in config_files:
        try:
            patches.append((f"file {str(path)!r}", load_yaml(pathlib.Path(path))))
        except ConfigError as err:
            problems += err.problems
    for text in overrides:
        parsed = _parse_override(text)
        if isinstance(parsed, str):
            problems.append(parsed)
        else:
            patches.append((f"override {text!r}", parsed))
    # A dry run on a copy finds every problem; only then are the same steps applied to ``cfg``.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        problems += _apply_patches(_working_copy(cfg), patches)
    if problems:
        raise ConfigError(problems, "cannot apply overrides")
    problems = _apply_patches(cfg, patches)
    if problems:  # the dry run saw the same state; a difference is a bug, reported all the same
        raise ConfigError(problems, "cannot apply overrides")
    return cfg


def parse_cli_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split command-line arguments into (``--config`` files, ``key=value`` overrides).

    Raises:
        ConfigError: for an unknown option or a ``--config`` without a file.
    """
    files, overrides, problems = [], [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                problems.append("--config needs a YAML file after it")
            else:
                files.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            files.append(arg.removeprefix("--config="))
        elif arg.startswith("-") and not arg.startswith("~"):
            problems.append(f"unknown option {arg!r}; use --config FILE and key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    if problems:
        raise ConfigError(problems, "cannot parse arguments")
    return files, overrides


def apply_cli_args(cfg: ConfigContainer, argv: Sequence[str]) -> ConfigContainer:
    """``apply_overrides`` for a command line such as ``--config run.yaml train.train_iters=10``."""
    files, overrides = parse_cli_args(argv)
    return apply_overrides(cfg, overrides, config_files=files)


# ------------------------------------------------------------------------------------------ parsing

def _parse_override(text: Any) -> DictConfig | str:
    """The override as a one-key OmegaConf patch, or a problem message."""
    if isinstance(text, str) and text.startswith("~"):
        return f"override {text!r}: deleting keys is not supported; set {text[1:].partition('=')[0]}=null instead"
    if not isinstance(text, str) or "=" not in text:
        return f"override {text!r} must look like key=value (e.g. train.train_iters=10)"
    key, _, value = text.partition("=")
    key = key.strip()
    key = key.removeprefix("++").removeprefix("+")
    if not _KEY.match(key):
        return f"override {text!r}: {key!r} is not a dotted key like section.field"
    try:
        return OmegaConf.from_dotlist([f"{key}={value}"])
    except (OmegaConfBaseException, ValueError) as err:
        return f"override {text!r}: cannot parse the value: {err}"


def _working_copy(cfg: ConfigContainer) -> ConfigContainer:
    clone = copy.copy(cfg)
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        try:
            setattr(clone, f.name, section_copy(getattr(cfg, f.name)))
        except (TypeError, copy.Error, RecursionError):  # e.g. a PEFT object holding a lock: try it in place
            continue
    return clone


def _apply_patches(cfg: ConfigContainer, patches: list[tuple[str, DictConfig]]) -> list[str]:
    """Apply each patch in turn; a patch with a problem is skipped whole. Returns every problem."""
    problems = []
    for source, patch in patches:
        try:
            data = _resolved(cfg, patch)
        except OmegaConfBaseException as err:
            problems.append(f"cannot resolve an interpolation: {str(err).splitlines()[0]} (from {source})")
            continue
        planner = _Planner(cfg, source)
        planner.plan_node(cfg, data, "")
        if planner.problems:
            problems += planner.problems
            continue
        for obj, name, value in planner.assignments:
            setattr(obj, name, value)
    return problems


def _resolved(cfg: ConfigContainer, patch: DictConfig) -> dict:
    """The patch as plain data; interpolations are resolved against the config with the patch applied."""
    raw = OmegaConf.to_container(patch, resolve=False)
    if "${" not in repr(raw):
        return raw
    context = OmegaConf.merge(OmegaConf.create(container_to_dict(cfg, warn=False)), patch)
    return _restrict(context, raw, "")


def _restrict(context: DictConfig, shape: Any, key: str) -> Any:
    """The values of ``context`` at the keys ``shape`` has (resolving only those)."""
    if isinstance(shape, dict):
        return {k: _restrict(context, v, f"{key}.{k}" if key else k) for k, v in shape.items()}
    value = OmegaConf.select(context, key, throw_on_resolution_failure=True)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


# ------------------------------------------------------------------------------------------ planning

class _Planner:
    """Walks a patch over the live config, converting values and recording assignments without making them."""

    def __init__(self, cfg: ConfigContainer, source: str) -> None:
        self.cfg = cfg
        self.source = source
        self.problems: list[str] = []
        self.assignments: list[tuple[Any, str, Any]] = []
        self._all_keys: list[str] | None = None

    def problem(self, message: str) -> None:
        self.problems.append(f"{message} (from {self.source})")

    def all_keys(self) -> list[str]:
        if self._all_keys is None:
            self._all_keys = _dotted_keys(self.cfg, "")
        return self._all_keys

    def plan_node(self, obj: Any, patch: dict, path: str) -> None:
        fields = {f.name: f for f in dataclasses.fields(obj) if f.init}
        hints = field_type_hints(type(obj))
        for key, value in patch.items():
            dotted = f"{path}.{key}" if path else key
            if key in (TARGET_KEY, REPR_KEY):
                continue  # handled by the parent: same class -> field-wise merge, other class -> rebuilt
            if key not in fields:
                siblings = [f"{path}.{name}" if path else name for name in fields]
                self.problem(unknown_key_message(dotted, siblings, self.all_keys()))
                continue
            self.plan_field(obj, fields[key], hints.get(key, Any), value, dotted)

    def plan_field(self, obj: Any, f: dataclasses.Field, tp: Any, value: Any, dotted: str) -> None:
        current = getattr(obj, f.name)
        if isinstance(value, dict):
            if REPR_KEY in value:
                warnings.warn(f"{dotted} ({value.get(TARGET_KEY)}) was saved by class path and repr only; the "
                              "current value is kept", ConfigWarning, stacklevel=4)
                return
            if isinstance(current, str) and isinstance(obj, ConfigContainer) and f.name == "mixed_precision":
                try:
                    current = get_mixed_precision_config(current)
                except ValueError as err:
                    self.problem(f"{dotted}: {err}")
                    return
                self.assignments.append((obj, f.name, current))
            if isinstance(current, MixedPrecisionConfig) and current is getattr(obj, f.name):
                current = dataclasses.replace(current)  # recipes may be shared; edit a copy
                self.assignments.append((obj, f.name, current))
            if self._same_class(current, value.get(TARGET_KEY), dotted):
                self.plan_node(current, value, dotted)
                return
            if isinstance(current, dict):
                value = _deep_merge(current, value)
        try:
            new = coerce_field(f, tp, value, dotted)
        except (CoercionError, ImportError) as err:
            for line in str(err).split("\n"):
                self.problem(line)
            return
        if isinstance(new, NotRestorable):
            self.problem(f"{dotted}: {new.target} cannot be rebuilt from YAML; set it in Python")
            return
        self.assignments.append((obj, f.name, new))

    def _same_class(self, current: Any, target: Any, dotted: str) -> bool:
        if not dataclasses.is_dataclass(current) or isinstance(current, type):
            return False
        if target is None:
            return True
        try:
            return import_object(target) is type(current)
        except ImportError:
            return False  # coerce() reports the bad _target_


def _deep_merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _dotted_keys(obj: Any, path: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        dotted = f"{path}.{f.name}" if path else f.name
        keys.append(dotted)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            keys += _dotted_keys(value, dotted)
    return keys

