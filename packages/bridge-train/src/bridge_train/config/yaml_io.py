"""Configs to plain data and YAML, and YAML text or files to plain data (:mod:`.fields` builds the objects).

Every dataclass node is written with ``_target_`` (its class's import path) so that reading it back rebuilds the
same classes, e.g. the model provider's subclass. ``torch.dtype`` is written by name (``bfloat16``), enums by member
name, callables by import path (``torch.nn.functional.silu``), a parsed pipeline layout by the text or list it was
parsed from. Not written:

- runtime hooks the training loop attaches to the model/optimizer configs (``no_sync_func``, ``timers``, ...);
- derived callables that ``finalize()`` recomputes (``init_method`` and friends, as ``functools.partial``; one
  the user set warns as below);
- anything else without a YAML form (a lambda as ``activation_func``): skipped with a :class:`ConfigWarning`
  naming the field; a top-level object that is not a dataclass (a dataset, tokenizer or PEFT object) is recorded
  by class path and repr only (``{_target_, _repr_}``).

YAML is read with OmegaConf, so a file may use interpolations such as ``${train.train_iters}``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import pathlib
import sys
import warnings
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bridge_convert.dtypes import dtype_name as dtype_to_hf

from .errors import ConfigError, ConfigWarning
from .fields import REPR_KEY, TARGET_KEY, import_path_of, type_hints

__all__ = ["RUNTIME_FIELDS", "load_yaml", "read_yaml", "to_dict", "to_yaml"]

RUNTIME_FIELDS = frozenset({
    "timers", "finalize_model_grads_func", "grad_scale_func", "moe_grad_scale_func", "mtp_grad_scale_func",
    "no_sync_func", "grad_sync_func", "param_sync_func", "experimental_attention_variant_loss_scale_func",
})
"""megatron-core config fields the training loop sets at run time (hooks bound to the live model); never saved."""

DERIVED_CALLABLES = frozenset({"init_method", "output_layer_init_method", "embedding_init_method"})
"""TransformerConfig fields that finalize() derives from ``init_method_std`` when None (the container's finalize()
records which it derived in the model's ``_derived_callables``; one set by the user has no YAML form and warns)."""

_UNSET = object()


def _plain(value: Any, path: str, skipped: list[str]) -> Any:
    """``value`` as YAML-safe data, or ``_UNSET`` when it has no YAML form."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value.replace("${", "\\${")  # a literal "${" must not become an OmegaConf interpolation
    if isinstance(value, torch.dtype):
        return dtype_to_hf(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, pathlib.PurePath):
        return str(value)
    layout = sys.modules.get("megatron.core.transformer.pipeline_parallel_layer_layout")
    if layout is not None and isinstance(value, layout.PipelineParallelLayerLayout):
        return _plain(value.input_data, path, skipped)  # finalize() parses the text / list it was made from again
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _dataclass(value, path, skipped)
    if isinstance(value, list | tuple) or (isinstance(value, dict) and all(isinstance(k, str | int) for k in value)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        plain = {k: _plain(v, f"{path}[{k!r}]", []) for k, v in items}
        if any(v is _UNSET for v in plain.values()):
            return _UNSET
        return plain if isinstance(value, dict) else list(plain.values())
    path_of = import_path_of(value) if callable(value) else None
    return path_of if path_of is not None else _UNSET


def _dataclass(obj: Any, path: str, skipped: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {TARGET_KEY: f"{type(obj).__module__}.{type(obj).__qualname__}"}
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init or f.name.startswith("_") or f.name in RUNTIME_FIELDS:
            continue
        dotted = f"{path}.{f.name}" if path else f.name
        value = getattr(obj, f.name)
        plain = _plain(value, dotted, skipped)
        if plain is _UNSET:
            if not path:  # a dataset, tokenizer or PEFT object that is not a dataclass
                plain = {TARGET_KEY: f"{type(value).__module__}.{type(value).__qualname__}", REPR_KEY: repr(value)}
                skipped.append(f"{dotted} (only its class path and repr are saved)")
            else:
                if f.name not in getattr(obj, "_derived_callables", ()):
                    skipped.append(f"{dotted} = {value!r}")
                continue
        if type(plain) is int and hints.get(f.name) in (float, float | None):
            plain = float(plain)  # megatron-core writes ``float = 1000``; keep the YAML stable across round trips
        out[f.name] = plain
    return out


def to_dict(obj: Any, *, warn: bool = True) -> dict[str, Any]:
    """A config (a dataclass, e.g. the container) as plain data, without its top-level ``_target_``.

    Args:
        obj: The config.
        warn: Emit one :class:`ConfigWarning` naming every field that had to be left out or recorded only.
    """
    skipped: list[str] = []
    out = _dataclass(obj, "", skipped)
    del out[TARGET_KEY]
    if skipped and warn:
        warnings.warn("these config values have no YAML form and are not saved in full (set them in Python, or use "
                      "an importable function / a dataclass): " + "; ".join(skipped), ConfigWarning, stacklevel=3)
    return out


@functools.cache
def _dumper() -> type[yaml.SafeDumper]:
    """PyYAML's safe dumper resolving plain scalars as OmegaConf's loader reads them: its float rule is looser
    (``1e3``, ``1e-4``), so such strings are quoted (written plain, they came back as floats)."""
    try:
        from omegaconf._yaml import get_yaml_loader
    except ImportError:  # omegaconf before 2.4
        from omegaconf._utils import get_yaml_loader
    return type("Dumper", (yaml.SafeDumper,), {"yaml_implicit_resolvers": get_yaml_loader().yaml_implicit_resolvers})


def to_yaml(obj: Any, path: str | pathlib.Path | None = None) -> str:
    """YAML text of ``obj`` (written to ``path`` too when given)."""
    text = yaml.dump(to_dict(obj), Dumper=_dumper(), sort_keys=False, default_flow_style=False, width=120,
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
        mark = getattr(err, "problem_mark", None)  # one line: the problem and where (PyYAML's text spans four)
        detail = ", ".join(str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None))
                           if part) or str(err)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError([f"{where} is not valid YAML: {' '.join(detail.split())}{at}"], "cannot load config") from None
    if not isinstance(conf, DictConfig):
        raise ConfigError([f"{where} must be a mapping of sections (train:, model:, ...), got a list"],
                          "cannot load config")
    return conf


def read_yaml(source: str | pathlib.Path) -> dict[str, Any]:
    """YAML text or a file as plain data, interpolations resolved.

    Raises:
        ConfigError: for unreadable YAML or an interpolation that does not resolve.
    """
    try:
        return OmegaConf.to_container(load_yaml(source), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError([f"cannot resolve an interpolation: {err}"], "cannot load config") from None
