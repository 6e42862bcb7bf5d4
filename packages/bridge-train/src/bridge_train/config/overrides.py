"""Hydra-style dotted overrides and ``--config file.yaml`` merging onto a live :class:`ConfigContainer`.

OmegaConf parses the text (``OmegaConf.from_dotlist`` for ``key=value``, ``OmegaConf.load`` for files); each value is
converted to its field's type by :mod:`.fields`. Files apply first, then overrides, in order, each onto the result of
the previous ones (so ``mixed_precision=bf16_mixed mixed_precision.grad_reduce_in_fp32=false`` edits the recipe and
``${train.train_iters}`` sees the values set before it). Everything is tried on a copy first: one
:class:`ConfigError` lists every problem, each naming the override or file it came from, and the config is unchanged.

Grammar, as in Hydra (config fields always exist; the entries of a dict field such as ``model.generation_config``
can be added and removed):

- ``key=value``: set a field (a mapping merges into a dataclass or dict field); values are YAML (``null``, ``true``,
  ``[1, 2]``, ``{k: v}``, ``'quoted'``, ``${other.key}``).
- ``+key=value``: add a dict entry that must not exist yet; a field always exists, so ``+field=...`` is refused.
- ``++key=value``: set or add, whether or not it exists.
- ``~key`` / ``~key=value``: reset a field to its default (remove a dict entry); with a value, only if the current
  value equals it.
- A model / optimizer / DDP precision field that the ``mixed_precision`` recipe sets at finalize() is refused
  when an override or a file changes it to another value (the recipe would undo it): set
  ``mixed_precision.<field>``.
- ``peft=<name>``: a PEFT method registered with :func:`register_peft_method` (a PEFT of that method already
  set stays as it is); ``peft.<field>=...`` edits it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import pathlib
import re
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .container import ConfigContainer
from .errors import ConfigError, ConfigWarning, unknown_key_message
from .fields import REPR_KEY, TARGET_KEY, convert, dotted_keys, import_object
from .mixed_precision import MixedPrecisionConfig, get_mixed_precision_config
from .protocols import peft_method
from .yaml_io import load_yaml, to_dict

__all__ = ["apply_cli_args", "apply_overrides", "parse_cli_args"]

_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class _Patch(NamedTuple):
    """One file or override: where it came from (for messages), the prefix (``""``, ``+``, ``++``, ``~``), the dotted
    key (``""`` for a file) and the value as a patch (the whole file; None for ``~key`` without a value)."""

    source: str
    op: str
    key: str
    conf: DictConfig | None
    number_text: str | None = None
    """The value's text when YAML read it as a number: a text field takes the text (``010``, not ``8``)."""


def apply_overrides(cfg: ConfigContainer, overrides: Sequence[str] = (), *,
                    config_files: Sequence[str | pathlib.Path] = ()) -> ConfigContainer:
    """Merge YAML files, then ``key=value`` overrides, into ``cfg`` (in place) with type conversion.

    Args:
        cfg: The config to change; it must not be finalized yet.
        overrides: Dotted overrides, e.g. ``["train.train_iters=10", "optimizer.lr=3e-4",
            "model.params_dtype=bfloat16", "peft=lora", "peft.dim=16"]`` (grammar in the module docstring).
        config_files: YAML files (whole or partial configs) merged before the overrides, in order.

    Returns:
        ``cfg``.

    Raises:
        ConfigError: listing every bad override or file entry; ``cfg`` is unchanged then.
    """
    if cfg.finalized:
        raise ConfigError(["the config is already finalized; apply overrides before finalize()"],
                          "cannot apply overrides")
    patches, problems = [], []
    for path in config_files:
        try:
            patches.append(_Patch(f"file {str(path)!r}", "", "", load_yaml(pathlib.Path(path))))
        except ConfigError as err:
            problems += err.problems
    for text in overrides:
        parsed = _parse_override(text)
        (problems if isinstance(parsed, str) else patches).append(parsed)
    with warnings.catch_warnings():  # the dry run's warnings would repeat the real run's
        warnings.simplefilter("ignore", ConfigWarning)
        problems += _apply_patches(cfg._working_copy([f.name for f in dataclasses.fields(cfg) if f.init]), patches)
    # the dry run saw the same state as the real run; a difference would be a bug, reported all the same
    problems = problems or _apply_patches(cfg, patches)
    if problems:
        raise ConfigError(problems, "cannot apply overrides")
    return cfg


def parse_cli_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split command-line arguments into (``--config`` files, overrides).

    Raises:
        ConfigError: for an unknown option or a ``--config`` without a file.
    """
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", action="append", default=[])
    try:
        args, overrides = parser.parse_known_args(list(argv))
    except argparse.ArgumentError:
        raise ConfigError(["--config needs a YAML file after it"], "cannot parse arguments") from None
    unknown = [f"unknown option {arg!r}; use --config FILE and key=value overrides" for arg in overrides
               if arg.startswith("-")]
    if unknown:
        raise ConfigError(unknown, "cannot parse arguments")
    return args.config, overrides


def apply_cli_args(cfg: ConfigContainer, argv: Sequence[str]) -> ConfigContainer:
    """``apply_overrides`` for a command line such as ``--config run.yaml train.train_iters=10``."""
    files, overrides = parse_cli_args(argv)
    return apply_overrides(cfg, overrides, config_files=files)


def _parse_override(text: Any) -> _Patch | str:
    """The override as a patch, or a problem message."""
    if not isinstance(text, str) or ("=" not in text and not text.startswith("~")):
        return f"override {text!r} must look like key=value (e.g. train.train_iters=10)"
    key, equals, value = text.partition("=")
    op = next(p for p in ("++", "+", "~", "") if key.strip().startswith(p))
    key = key.strip().removeprefix(op)
    if not _KEY.match(key):
        return f"override {text!r}: {key!r} is not a dotted key like section.field"
    try:
        conf = OmegaConf.from_dotlist([f"{key}={value}"]) if equals or op != "~" else None
    except (OmegaConfBaseException, ValueError) as err:
        return f"override {text!r}: cannot parse the value: {err}"
    except yaml.YAMLError as err:  # e.g. an unclosed [ or {; ${...} inside a flow list must be quoted
        parts = (getattr(err, "context", None), getattr(err, "problem", None))
        detail = ", ".join(str(part) for part in parts if part) or str(err).splitlines()[0]
        return (f"override {text!r}: {value!r} is not valid YAML ({detail}); close the brackets, and quote "
                "text or ${...} inside [...] / {...} ('x', \"${a.b}\")")
    raw = OmegaConf.to_container(conf, resolve=False) if conf is not None else None
    leaf = functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None, key.split("."), raw)
    number = isinstance(leaf, int | float) and not isinstance(leaf, bool)
    return _Patch(f"override {text!r}", op, key, conf, value.strip() if number else None)


def _apply_patches(cfg: ConfigContainer, patches: list[_Patch]) -> list[str]:
    """Apply each patch in turn; a patch with a problem is skipped whole. Returns every problem."""
    problems, assigned = [], []
    for patch in patches:
        plan = _Plan(cfg, patch.source, (patch.key, patch.number_text) if patch.number_text else None)
        try:
            data = _resolved(cfg, patch.conf) if patch.conf is not None else None
        except OmegaConfBaseException as err:
            plan.problem(f"cannot resolve an interpolation: {str(err).splitlines()[0]}")
        else:
            if patch.op in ("+", "~"):
                plan.add_or_remove(patch.op, patch.key, data)
            else:
                plan.node(cfg, data, "")
        problems += plan.problems
        for obj, name, value in plan.assignments if not plan.problems else ():
            if getattr(obj, name) != value:  # a change (a file carries whole sections: only what it changes)
                assigned.append((patch.source, obj, name))
            setattr(obj, name, value)
    return problems + _undone_by_mixed_precision(cfg, assigned)


def _undone_by_mixed_precision(cfg: ConfigContainer, assigned: list[tuple[str, Any, str]]) -> list[str]:
    """Model / optimizer / DDP values set here that the ``mixed_precision`` recipe would overwrite at finalize()."""
    recipe = cfg.mixed_precision
    try:
        recipe = get_mixed_precision_config(recipe) if isinstance(recipe, str) else recipe
    except ValueError:
        return []  # a bad name is reported where it is set
    if not isinstance(recipe, MixedPrecisionConfig):
        return []
    targets = recipe.targets()
    problems = []
    for source, obj, name in assigned:
        section = next((s for s in ("model", "optimizer", "ddp") if getattr(cfg, s) is obj), None)
        if section is None or name not in targets[section]:
            continue
        value, field = targets[section][name]
        if getattr(obj, name) != value:
            problems.append(f"{section}.{name} ({getattr(obj, name)!r}) would be set back to {value!r} by "
                            f"{recipe.label} at finalize(); set mixed_precision.{field} to it instead, or "
                            f"mixed_precision=null to set the precision fields yourself (from {source})")
    return problems


def _resolved(cfg: ConfigContainer, patch: DictConfig) -> dict:
    """The patch as plain data; interpolations are resolved against the config with the patch applied."""
    raw = OmegaConf.to_container(patch, resolve=False)
    if "${" not in repr(raw):
        return raw
    # to_dict escapes the config's own "${", so resolving everything resolves only the patch's interpolations
    full = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(to_dict(cfg, warn=False)), patch), resolve=True)

    def pick(shape: dict, values: dict) -> dict:  # the resolved values at the keys the patch has
        return {k: pick(v, values[k]) if isinstance(v, dict) else values[k] for k, v in shape.items()}

    return pick(raw, full)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Plan:
    """Walks a patch over the live config, converting values and recording assignments without making them."""

    def __init__(self, cfg: ConfigContainer, source: str, number_text: tuple[str, str] | None = None) -> None:
        self.cfg, self.source, self.number_text = cfg, source, number_text
        self.problems: list[str] = []
        self.assignments: list[tuple[Any, str, Any]] = []

    def problem(self, message: str) -> None:
        self.problems.append(f"{message} (from {self.source})")

    def unknown(self, dotted: str, obj: Any, path: str) -> None:
        siblings = [_join(path, f.name) for f in dataclasses.fields(obj) if f.init]
        self.problem(unknown_key_message(dotted, siblings, dotted_keys(self.cfg)))

    def node(self, obj: Any, patch: dict, path: str) -> None:
        names = {f.name for f in dataclasses.fields(obj) if f.init}
        for key, value in patch.items():
            if key in (TARGET_KEY, REPR_KEY):
                continue  # handled by the parent: same class -> field-wise merge, other class -> rebuilt
            if key not in names:
                self.unknown(_join(path, key), obj, path)
            else:
                self.field(obj, key, value, _join(path, key))

    def field(self, obj: Any, name: str, value: Any, dotted: str) -> None:
        current = getattr(obj, name)
        if obj is self.cfg and name == "peft" and isinstance(value, str):
            try:
                method = peft_method(value)
            except ValueError as err:
                return self.problem(f"{dotted}: {err}")
            if type(method) is not type(current):  # the method already set keeps its settings
                self.assignments.append((obj, name, method))
            return
        if obj is self.cfg and name == "mixed_precision" and isinstance(value, str):
            try:  # the name is kept (finalize() applies the recipe), but a typo is refused now
                get_mixed_precision_config(value)
            except ValueError as err:
                return self.problem(f"{dotted}: {err}")
        if isinstance(value, dict):
            if REPR_KEY in value:
                warnings.warn(f"{dotted} ({value.get(TARGET_KEY)}) was saved by class path and repr only; the "
                              "current value is kept", ConfigWarning, stacklevel=5)
                return
            if obj is self.cfg and name == "mixed_precision" and isinstance(current, str | MixedPrecisionConfig):
                try:  # a named recipe becomes its config (recipes may be shared: edit a copy)
                    current = dataclasses.replace(get_mixed_precision_config(current))
                except ValueError as err:
                    return self.problem(f"{dotted}: {err}")
                self.assignments.append((obj, name, current))
            if _same_class(current, value.get(TARGET_KEY)):
                return self.node(current, value, dotted)
            if isinstance(current, dict):
                value = _deep_merge(current, value)
        values, problems = convert(type(obj), {name: value}, dotted.rpartition(".")[0])
        for message in problems:
            self.problem(message)
        if not problems:
            converted = values[name]
            if isinstance(converted, str) and self.number_text and self.number_text[0] == dotted:
                converted = self.number_text[1]  # YAML 1.1 read 010 as 8, 2024_01 as 202401, 1e3 as 1000.0
            self.assignments.append((obj, name, converted))

    def add_or_remove(self, op: str, key: str, data: dict | None) -> None:
        """``+key=value`` (a new dict entry) and ``~key[=value]`` (reset a field to its default, remove a dict entry)."""
        obj, path, parts = self.cfg, "", key.split(".")
        while len(parts) > 1 and dataclasses.is_dataclass(getattr(obj, parts[0], None)):
            path, obj, parts = _join(path, parts[0]), getattr(obj, parts[0]), parts[1:]
        (name, *entry), dotted = parts, _join(path, parts[0])
        field = next((f for f in dataclasses.fields(obj) if f.init and f.name == name), None)
        if field is None:
            return self.unknown(dotted, obj, path)
        current = getattr(obj, name)
        if entry and not isinstance(current, dict):
            return self.problem(f"{key}: {dotted} is {current!r}, which has no entries to add or remove")
        holder = functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None, entry[:-1], current)
        exists = not entry or (isinstance(holder, dict) and entry[-1] in holder)
        if op == "+":
            if exists:
                return self.problem(f"+{key}: {key} already exists (config fields always do); write {key}=... to "
                                    f"set it, or ++{key}=... to set it whether or not it exists")
            return self.node(self.cfg, data, "")
        if not exists:
            return self.problem(f"~{key}: {key} does not exist; nothing to remove")
        if data is not None:  # ~key=value: only if the current value equals it
            value = functools.reduce(dict.__getitem__, key.split("."), data)
            old = holder[entry[-1]] if entry else current
            if (value if entry else convert(type(obj), {name: value}, path)[0].get(name, value)) != old:
                shown = repr(old) if len(repr(old)) <= 80 else f"a {type(old).__name__}"  # not a whole section
                return self.problem(f"~{key}={value}: {key} is {shown}, not {value!r}; nothing was removed")
        if entry:
            new = copy.deepcopy(current)
            del functools.reduce(dict.__getitem__, entry[:-1], new)[entry[-1]]
        elif field.default is not dataclasses.MISSING:
            new = field.default
        elif field.default_factory is not dataclasses.MISSING:
            new = field.default_factory()
        else:
            return self.problem(f"~{key}: {dotted} is required and has no default to reset to; set it instead")
        self.assignments.append((obj, name, new))


def _same_class(current: Any, target: Any) -> bool:
    if not dataclasses.is_dataclass(current) or isinstance(current, type):
        return False
    try:
        return target is None or import_object(target) is type(current)
    except ImportError:
        return False  # convert() reports the bad _target_


def _deep_merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out
