"""Configs to plain data and YAML, and back.

Every dataclass node is written with ``_target_`` (its class's import path) so that :func:`from_yaml` rebuilds the
same classes, e.g. the model provider's subclass. Values are written as YAML scalars: ``torch.dtype`` as its name
(``bfloat16``), enums by member name, callables by import path (``torch.nn.functional.silu``). Not written:

- runtime hooks the training loop attaches to the model/optimizer configs (``no_sync_func``, ``timers``, ...);
- derived callables that ``finalize()`` recomputes (``init_method`` and friends as ``functools.partial``);
- ``peft`` beyond its class path and repr (``{_target_, _repr_}``), as for any object that is not a dataclass;
- anything else that has no YAML form (a lambda as ``activation_func``): skipped with a :class:`ConfigWarning`
  naming the field.

YAML is read with OmegaConf, so a file may use interpolations such as ``${train.train_iters}``.
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
import warnings
from typing import TYPE_CHECKING, Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .coerce import REPR_KEY, TARGET_KEY, CoercionError, NotRestorable, build_dataclass, field_type_hints
from .errors import ConfigError, ConfigWarning
from .import_paths import import_path_of

if TYPE_CHECKING:
    from .container import ConfigContainer

__all__ = [
    "RUNTIME_FIELDS",
    "container_to_dict",
    "container_from_dict",
    "from_yaml",
    "load_yaml",
    "to_plain",
    "to_yaml",
]

RUNTIME_FIELDS = frozenset({
    "timers", "finalize_model_grads_func", "grad_scale_func", "moe_grad_scale_func", "mtp_grad_scale_func",
    "no_sync_func", "grad_sync_func", "param_sync_func", "experimental_attention_variant_loss_scale_func",
})
"""megatron-core config fields the training loop sets at run time (hooks bound to the live model); never saved."""

_DERIVED_CALLABLES = frozenset({"init_method", "output_layer_init_method", "embedding_init_method"})
"""TransformerConfig fields that finalize() derives from ``init_method_std`` when None."""

_UNSET = object()
_FLOAT_TYPES = (float, float | None)  # get_type_hints gives typing.Optional[float], which compares equal


def to_plain(value: Any) -> Any:
    """``value`` as YAML-safe data, or ``_UNSET`` when it has no YAML form."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value.replace("${", "\\${")  # a literal "${" must not become an OmegaConf interpolation
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _dataclass_to_dict(value, "", [])
    if isinstance(value, list | tuple):
        items = [to_plain(v) for v in value]
        return _UNSET if any(i is _UNSET for i in items) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str | int | bool) for k in value):
            return _UNSET
        items = {k: to_plain(v) for k, v in value.items()}
        return _UNSET if any(i is _UNSET for i in items.values()) else items
    if callable(value):
        path = import_path_of(value)
        return path if path is not None else _UNSET
    return _UNSET


def _dataclass_to_dict(obj: Any, path: str, skipped: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {TARGET_KEY: f"{type(obj).__module__}.{type(obj).__qualname__}"}
    hints = field_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init or f.name.startswith("_") or f.name in RUNTIME_FIELDS:
            continue
        value = getattr(obj, f.name)
        dotted = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = _dataclass_to_dict(value, dotted, skipped)
            continue
        plain = to_plain(value)
        if plain is _UNSET:
            if f.name not in _DERIVED_CALLABLES:
                skipped.append(f"{dotted} = {value!r}")
            continue
        if type(plain) is int and hints.get(f.name) in _FLOAT_TYPES:
            plain = float(plain)  # megatron-core writes ``float = 1000``; keep the YAML stable across round trips
        out[f.name] = plain
    return out


def _opaque(obj: Any) -> dict[str, str]:
    return {TARGET_KEY: f"{type(obj).__module__}.{type(obj).__qualname__}", REPR_KEY: repr(obj)}


def container_to_dict(cfg: ConfigContainer, *, warn: bool = True) -> dict[str, Any]:
    """The container as plain data (what :func:`to_yaml` writes).

    Args:
        cfg: The config.
        warn: Emit one :class:`ConfigWarning` naming every field that had to be left out.
    """
    skipped: list[str] = []
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        if f.name == "peft" and value is not None:
            out[f.name] = _opaque(value)  # a PEFT method is code + state: only its class and repr are recorded
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = _dataclass_to_dict(value, f.name, skipped)
        elif f.name in ("dataset", "tokenizer") and value is not None:
            skipped.append(f"{f.name} = {value!r} (not a dataclass: only its class path and repr are saved)")
            out[f.name] = _opaque(value)
        else:
            plain = to_plain(value)
            if plain is _UNSET:
                skipped.append(f"{f.name} = {value!r}")
                continue
            out[f.name] = plain
    if skipped and warn:
        warnings.warn("these config values have no YAML form and are left out of the saved config (set them in "
                      "Python, or use an importable function / a dataclass): " + "; ".join(skipped),
                      ConfigWarning, stacklevel=3)
    return out


def to_yaml(cfg: ConfigContainer, path: str | pathlib.Path | None = None) -> str:
    """YAML text of ``cfg`` (written to ``path`` too when given)."""
    text = yaml.safe_dump(container_to_dict(cfg), sort_keys=False, default_flow_style=False, width=120,
                          allow_unicode=True)
    if path is not None:
        pathlib.Path(path).write_text(text)
    return text


def load_yaml(source: str | pathlib.Path) -> DictConfig:
    """Parse YAML text or a file (a ``Path``, or a one-line string naming an existing / ``.yaml`` file).

    Raises:
        ConfigError: for a missing file, invalid YAML, or a document that is not a mapping.
    """
    is_path = isinstance(source, pathlib.Path) or (
        "\n" not in source and (pathlib.Path(source).is_file() or source.endswith((".yaml", ".yml"))))
    where = str(source) if is_path else "YAML text"
    try:
        conf = OmegaConf.load(source) if is_path else OmegaConf.create(source)
    except FileNotFoundError:
        raise ConfigError([f"config file {str(source)!r} does not exist"], "cannot load config") from None
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError([f"{where} is not valid YAML: {err}"], "cannot load config") from None
    if not isinstance(conf, DictConfig):
        raise ConfigError([f"{where} must be a mapping of sections (train:, model:, ...), got a list"],
                          "cannot load config")
    return conf


def container_from_dict(data: dict[str, Any]) -> ConfigContainer:
    """Build a :class:`ConfigContainer` from plain data (the inverse of :func:`container_to_dict`).

    Raises:
        ConfigError: listing every unknown key (with the closest valid one), bad value and missing field.
    """
    from .container import ConfigContainer

    try:
        cfg = build_dataclass(ConfigContainer, data)
    except CoercionError as err:
        raise ConfigError(str(err).split("\n"), "cannot build config from YAML") from None
    for name in ("dataset", "tokenizer", "peft"):
        value = getattr(cfg, name)
        if isinstance(value, NotRestorable):
            warnings.warn(f"{name} ({value.target}: {value.repr}) was saved by class path and repr only and is not "
                          f"restored; set cfg.{name} in Python", ConfigWarning, stacklevel=3)
            setattr(cfg, name, None)
    return cfg


def from_yaml(source: str | pathlib.Path) -> ConfigContainer:
    """Build a :class:`ConfigContainer` from YAML text or a file; interpolations are resolved.

    Raises:
        ConfigError: for unreadable YAML or a config that does not fit the dataclasses.
    """
    conf = load_yaml(source)
    try:
        data = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError([f"cannot resolve an interpolation: {err}"], "cannot load config") from None
    return container_from_dict(data)
