"""What each config field accepts, checked in one place: a pydantic schema built from the dataclass annotations.

YAML files and ``key=value`` overrides arrive parsed by OmegaConf (``3e-4`` a float, ``[1, 2]`` a list); Python code
assigns real objects. Both go through one schema per class: :func:`build` and :func:`convert` read parsed values in
pydantic's lax mode (``"10"`` -> 10 for an ``int``), :func:`type_problems` checks the values a config holds in strict
mode (``cfg.train.train_iters = "10"`` is reported, not converted). This module adds only what pydantic cannot know:
``torch.dtype`` by name, callables and classes by import path (``torch.nn.functional.silu``), enums by member name
(how YAML writes them), case-insensitive ``Literal`` strings, and nested dataclasses named by ``_target_``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import importlib
import math
import types
import typing
from typing import Annotated, Any, Literal, NotRequired, TypedDict, Union

import torch
from pydantic import BeforeValidator, ConfigDict, PlainValidator, TypeAdapter, ValidationError, ValidationInfo

from bridge_convert.dtypes import parse_dtype

from .errors import ConfigError, unknown_key_message

__all__ = ["REPR_KEY", "TARGET_KEY", "NotRestorable", "at_least", "build", "convert", "describe", "dotted_keys",
           "import_object", "import_path_of", "type_hints", "type_problems"]

TARGET_KEY = "_target_"
"""Key of a mapping that names the class to build (Hydra's spelling)."""
REPR_KEY = "_repr_"
"""Key of a mapping that records an object which cannot be rebuilt from YAML (only its class and repr are saved)."""

_PUBLIC_HOMES = ("torch.nn.functional", "torch", "torch.nn.init")


@dataclasses.dataclass(frozen=True, slots=True)
class NotRestorable:
    """Placeholder for a saved ``{_target_, _repr_}`` record: the object itself cannot be rebuilt from YAML."""

    target: str
    repr: str


def import_object(path: str) -> Any:
    """The object at ``path``: the longest importable module prefix, then attribute lookups.

    Raises:
        ImportError: if no prefix imports or an attribute is missing.
    """
    if not isinstance(path, str) or not path or path.startswith(".") or " " in path:
        raise ImportError(f"{path!r} is not an import path like 'package.module.name'")
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ImportError as err:
            # Only "this prefix is not a module" means try a shorter one; a module that fails while importing
            # its own dependencies is a real error.
            if err.name is not None and not module_name.startswith(err.name) and not err.name.startswith(module_name):
                raise
            continue
        try:
            return functools.reduce(getattr, parts[cut:], obj)
        except AttributeError:
            raise ImportError(f"cannot import {path!r}: {module_name!r} has no attribute path "
                              f"{'.'.join(parts[cut:])!r}") from None
    raise ImportError(f"cannot import {path!r}: no module {parts[0]!r}")


def import_path_of(obj: Any) -> str | None:
    """``module.qualname`` of a function or class if importing that path gives back ``obj``, else None (lambdas,
    closures, bound methods and ``functools.partial`` objects have none)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    # Builtins defined in private places (F.gelu lives in torch._C._nn, torch.tanh's qualname is
    # _VariableFunctionsClass.tanh): prefer the public name.
    name = getattr(obj, "__name__", qualname)
    private = "._" in f".{module}.{qualname}"
    for path in [f"{home}.{name}" for home in (*_PUBLIC_HOMES, module) if private] + [f"{module}.{qualname}"]:
        try:
            if import_object(path) is obj:
                return path
        except ImportError:
            continue
    return None


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass; if they cannot be resolved (a TYPE_CHECKING-only name), every field
    accepts any value."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001
        return {f.name: Any for f in dataclasses.fields(cls)}


def _is_node(tp: Any) -> bool:
    """A dataclass or Protocol annotation: built from a mapping by :func:`build`, not by pydantic."""
    return isinstance(tp, type) and (dataclasses.is_dataclass(tp) or bool(getattr(tp, "_is_protocol", False)))


def _is_callable(tp: Any) -> bool:
    return tp in (collections.abc.Callable, typing.Callable) or typing.get_origin(tp) is collections.abc.Callable


def describe(tp: Any, python: bool = False) -> str:
    """Human-readable name of an annotation, for messages: as text is written, or as Python values (``python``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return "any value"
    if tp is type(None):
        return "None" if python else "null"
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a, python) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is torch.dtype:
        return "a torch.dtype" if python else "a torch dtype name (e.g. bfloat16, float16, float32)"
    if _is_callable(tp):
        return "a callable" if python else "a callable's import path (e.g. torch.nn.functional.silu)"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"a member of {tp.__name__}" if python else f"one of {[m.name for m in tp]}"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join('...' if a is ... else describe(a, python) for a in args)}]"
    return f"a mapping for {tp.__name__}" if _is_node(tp) else getattr(tp, "__name__", str(tp))


# ------------------------------------------------------------------------------------ what pydantic cannot know

def _lax(info: ValidationInfo) -> bool:
    return not (info.context or {}).get("strict")


def _imported(path: str) -> Any:
    try:
        return import_object(path)
    except ImportError as err:
        raise ValueError(str(err)) from None


def _dtype(value: Any, info: ValidationInfo) -> torch.dtype:
    if isinstance(value, torch.dtype) or (isinstance(value, str) and _lax(info)):
        return parse_dtype(value)
    raise ValueError(f"expected {describe(torch.dtype)}")


def _callable(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str) and _lax(info):
        obj = _imported(value)
        if not callable(obj):
            raise ValueError(f"{value!r} imports {obj!r}, which is not callable")
        return obj
    if callable(value) and not isinstance(value, type | dict):
        return value
    raise ValueError(f"expected {describe(collections.abc.Callable)}")


def _instance_of(tp: type):
    def check(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and _lax(info) and (tp is type or typing.get_origin(tp) is type):
            value = _imported(value)
        if isinstance(value, typing.get_origin(tp) or tp) or (
                getattr(tp, "_is_protocol", False) and not getattr(tp, "_is_runtime_protocol", False)):
            return value
        raise ValueError(f"expected {describe(tp)}")

    return check


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r} (bool)")
    return value


def _by_name(named: dict[str, Any]):
    """Text read as the choice it names: ``flash`` for ``AttnBackend.flash`` (enums are written by member name),
    ``"2"`` for ``Literal[2]``; case-insensitively (``wsd`` for ``Literal["WSD"]``) when only one choice matches."""
    def read(value: Any, info: ValidationInfo) -> Any:
        if not _lax(info) or isinstance(value, bool) or not isinstance(value, str | int) or value in named.values():
            return value
        text = str(value)
        same = [c for n, c in named.items() if n == text] or [c for n, c in named.items() if n.lower() == text.lower()]
        return same[0] if len(same) == 1 else value

    return read


def _accepts(tp: Any) -> Any:
    """``tp`` rewritten so that pydantic validates it the way configs are written."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return Any
    if tp is torch.dtype:
        return Annotated[Any, PlainValidator(_dtype)]
    if _is_callable(tp):
        return Annotated[Any, PlainValidator(_callable)]
    if tp in (int, float):
        return Annotated[tp, BeforeValidator(_not_bool)]
    if origin in (Union, types.UnionType):
        return Union[tuple(_accepts(a) for a in args)]  # noqa: UP007
    if origin is Literal:
        return Annotated[tp, BeforeValidator(_by_name({str(a): a for a in args}))]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return Annotated[tp, BeforeValidator(_by_name(dict(tp.__members__)))]
    if origin in (list, tuple, dict, set, frozenset, collections.abc.Sequence, collections.abc.Mapping) and args:
        base = {collections.abc.Sequence: list, collections.abc.Mapping: dict}.get(origin, origin)
        return base[tuple(a if a is ... else _accepts(a) for a in args)]
    if origin is type or tp is type or _is_node(tp) or (
            isinstance(tp, type) and tp.__module__ not in ("builtins", "pathlib")):
        return Annotated[Any, PlainValidator(_instance_of(tp))]
    return tp


@functools.cache
def _adapter(cls: type) -> tuple[TypeAdapter, dict[str, Any]]:
    """The schema of ``cls``'s init fields (every key optional), and each field's annotation."""
    hints = type_hints(cls)
    declared = {}
    for f in dataclasses.fields(cls):
        if f.init:
            tp = hints.get(f.name, Any)
            # megatron-core writes ``pipeline_dtype: torch.dtype = None``: None stays allowed there
            declared[f.name] = tp | None if f.default is None and tp is not Any else tp
    schema = TypedDict(f"{cls.__name__}Fields", {n: NotRequired[_accepts(tp)] for n, tp in declared.items()})
    schema.__pydantic_config__ = ConfigDict(arbitrary_types_allowed=True, coerce_numbers_to_str=True)
    return TypeAdapter(schema), declared


def _problems(err: ValidationError, declared: dict[str, Any], data: dict, path: str, strict: bool) -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        name, *inner = e["loc"]
        dotted, value, tp = f"{path}.{name}" if path else str(name), data[name], declared[name]
        if strict:
            out.append(f"{dotted} must be {describe(tp, python=True)}, got {value!r} ({type(value).__name__})")
            continue
        if e["type"] == "value_error" or "error" in e.get("ctx", {}):
            detail = str(e["ctx"]["error"])
        else:
            shown = f"{value!r} ({type(value).__name__})" if value is not None else "null"
            detail = f"expected {describe(tp)}, got {shown}"
            if "[" in describe(tp) and not isinstance(value, list | tuple | dict):
                detail += "; write a list as [a, b]"
        items = [f" (item {i}: {e['msg']})" for i in inner if isinstance(i, int)][:1]
        out.append(f"{dotted}: cannot use {value!r}: {detail}{''.join(items)}")
    return list(dict.fromkeys(out))


def convert(cls: type, data: dict[str, Any], path: str = "",
            everywhere: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """Read parsed values for some fields of dataclass ``cls``: (converted values, every problem).

    A mapping for a dataclass or Protocol field is built by :func:`build`; an unknown key gets a suggestion among
    its siblings and ``everywhere`` (every valid dotted key, for a key put in the wrong section).
    """
    adapter, declared = _adapter(cls)
    problems, nodes, plain = [], {}, {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else key
        if key not in declared:
            problems.append(unknown_key_message(dotted, [f"{path}.{n}" if path else n for n in declared], everywhere))
            continue
        members = [a for a in typing.get_args(declared[key]) if a is not type(None)] or [declared[key]]
        node = next((m for m in members if _is_node(m) or m is Any), None)
        if isinstance(value, dict) and node is not None and (_is_node(node) or TARGET_KEY in value):
            try:
                nodes[key] = build(node, value, dotted, everywhere)
            except ConfigError as err:
                problems += err.problems
        else:
            plain[key] = value
    try:
        plain = adapter.validate_python(plain)
    except ValidationError as err:
        problems += _problems(err, declared, plain, path, strict=False)
    return {**plain, **nodes}, problems


def build(tp: Any, data: dict[str, Any], path: str = "", everywhere: tuple[str, ...] | None = None) -> Any:
    """Build the dataclass that ``data`` describes (``data["_target_"]`` names the class when given).

    ``everywhere``: the valid dotted keys for suggestions; None: every key of ``tp`` and the dataclasses it nests.

    Returns:
        The object, or a :class:`NotRestorable` for a saved ``{_target_, _repr_}`` record.

    Raises:
        ConfigError: listing every unknown key, bad value and missing required field below this node.
    """
    data = dict(data)
    target = data.pop(TARGET_KEY, None)
    if REPR_KEY in data:
        return NotRestorable(target=str(target), repr=str(data.pop(REPR_KEY)))
    where = f"{path}.{TARGET_KEY}" if path else TARGET_KEY
    cls = tp
    if target is not None:
        try:
            cls = import_object(target)
        except ImportError as err:
            raise ConfigError([f"{where}: {err}"]) from None
        if _is_node(tp) and not getattr(tp, "_is_protocol", False) and not (
                isinstance(cls, type) and issubclass(cls, tp)):
            raise ConfigError([f"{where}: {target!r} is not a subclass of {tp.__name__}"])
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError([f"{path or 'value'}: {describe(tp)} needs {TARGET_KEY}: <import path of a dataclass>"])
    values, problems = convert(cls, data, path, dotted_keys(cls, path) if everywhere is None else everywhere)
    problems += [f"{path + '.' if path else ''}{f.name} is required ({describe(type_hints(cls).get(f.name, Any))}) "
                 "but missing" for f in dataclasses.fields(cls) if f.init and f.name not in data
                 and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if problems:
        raise ConfigError(problems)
    try:
        return cls(**values)
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError([f"{path or cls.__name__}: cannot build {cls.__name__}: {err}"]) from None


def dotted_keys(node: Any, path: str = "") -> tuple[str, ...]:
    """Every dotted key below ``node``: a dataclass instance (through its values) or class (its annotations)."""
    keys = []
    for name, tp in _adapter(node if isinstance(node, type) else type(node))[1].items():
        dotted = f"{path}.{name}" if path else name
        if isinstance(node, type):
            child = next((m for m in (*typing.get_args(tp), tp) if isinstance(m, type) and dataclasses.is_dataclass(m)),
                         None)
        else:
            child = getattr(node, name)
        keys += [dotted, *(dotted_keys(child, dotted) if dataclasses.is_dataclass(child) else ())]
    return tuple(keys)


def type_problems(obj: Any, prefix: str) -> list[str]:
    """Fields of dataclass ``obj`` whose value does not have the declared type (``"10"`` in an ``int`` field).

    Values from YAML and overrides were converted by :func:`convert` already; this catches Python assignments
    before a comparison deep in a check raises TypeError. Nested dataclass values are checked by their own call.
    """
    adapter, declared = _adapter(type(obj))
    data = {name: getattr(obj, name) for name in declared if not dataclasses.is_dataclass(getattr(obj, name))}
    try:
        adapter.validate_python(data, strict=True, context={"strict": True})
    except ValidationError as err:
        return _problems(err, declared, data, prefix, strict=True)
    return _non_finite(obj, prefix)


def _non_finite(obj: Any, prefix: str) -> list[str]:
    """NaN in any float field, and infinity where the default is finite (a range check lets both through: every
    comparison with NaN is False, and inf passes ``> 0``)."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name) if f.init else None
        if not isinstance(value, float) or math.isfinite(value):
            continue
        if math.isnan(value) or not (isinstance(f.default, float) and math.isinf(f.default)):
            out.append(f"{prefix}.{f.name} must be a finite number, got {value}")
    return out


def at_least(obj: Any, prefix: str, *, above: bool = False, null_disables: bool = True,
             **minimums: float) -> list[str]:
    """``"train.train_iters must be >= 1, got 0"`` for each named field of ``obj`` below its minimum (``above``:
    ``> minimum``). None passes: the type check has refused None where the field does not allow it. A field that
    takes None is told it can be set to null to disable it, unless ``null_disables`` is False (None means a default
    there, as for ``optimizer.lr`` or ``scheduler.lr_decay_iters``)."""
    values = {name: getattr(obj, name) for name in minimums}
    return [f"{prefix}.{name} must be {'>' if above else '>='} {minimum}, got {values[name]}"
            + ("; set it to null to disable" if null_disables
               and type(None) in typing.get_args(type_hints(type(obj))[name]) else "")
            for name, minimum in minimums.items()
            if values[name] is not None and (values[name] <= minimum if above else values[name] < minimum)]
