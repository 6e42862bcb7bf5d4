"""Turn YAML / command-line values into the types that dataclass annotations ask for.

OmegaConf parses the text (``3e-4`` -> float, ``[1,2]`` -> list, ``null`` -> None); this module checks and converts
the parsed value against the field's annotation: ``int``, ``float``, ``bool``, ``str``, ``X | None``, ``Literal``,
``list``/``tuple``/``dict``, enums, ``torch.dtype`` (``"bfloat16"``), callables (an import path such as
``"torch.nn.functional.silu"``), ``pathlib.Path`` and nested dataclasses (a mapping, with ``_target_`` naming the
class when it is not the annotated one). OmegaConf's own structured configs cannot hold ``torch.dtype`` or callables,
which megatron-core's TransformerConfig is full of; see the package README.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import enum
import functools
import inspect
import pathlib
import types
import typing
from typing import Any, Literal, Union

import torch

from .import_paths import import_object

__all__ = [
    "REPR_KEY",
    "TARGET_KEY",
    "CoercionError",
    "NotRestorable",
    "build_dataclass",
    "coerce",
    "conforms",
    "describe",
    "field_type_hints",
    "is_protocol",
]

TARGET_KEY = "_target_"
"""Key of a mapping that names the class to build (Hydra's spelling)."""
REPR_KEY = "_repr_"
"""Key of a mapping that records an object which cannot be rebuilt from YAML (only its class and repr are saved)."""

_DTYPE_ALIASES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "double": torch.float64,
}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class CoercionError(ValueError):
    """A value that does not fit its annotation; the message says what was expected."""


@dataclasses.dataclass(frozen=True, slots=True)
class NotRestorable:
    """Placeholder for a saved ``{_target_, _repr_}`` record: the object itself cannot be rebuilt from YAML."""

    target: str
    repr: str


@functools.cache
def field_type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields; a field whose annotation cannot be resolved maps to Any."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - a forward reference to a TYPE_CHECKING-only name; resolve field by field
        pass
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        module = inspect.getmodule(klass)
        namespace = vars(module) if module else {}
        for name, ann in getattr(klass, "__annotations__", {}).items():
            if isinstance(ann, str):
                try:
                    ann = eval(ann, dict(namespace), dict(vars(klass)))  # noqa: S307 - annotations of our classes
                except Exception:  # noqa: BLE001
                    ann = Any
            hints[name] = ann
    return hints


def is_protocol(tp: Any) -> bool:
    """True for a ``typing.Protocol`` class (an interface, not something to instantiate)."""
    return isinstance(tp, type) and bool(getattr(tp, "_is_protocol", False))


def describe(tp: Any) -> str:
    """Human-readable name of an annotation, for error messages."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return "any value"
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is torch.dtype:
        return "a torch dtype name (e.g. bfloat16, float16, float32)"
    if _is_callable_type(tp):
        return "a callable's import path (e.g. torch.nn.functional.silu)"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {[m.name for m in tp]}"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(describe(a) if a is not Ellipsis else '...' for a in args)}]"
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp) or is_protocol(tp):
            return f"a mapping for {tp.__name__}"
        return tp.__name__
    return str(tp)


def _is_callable_type(tp: Any) -> bool:
    return tp is collections.abc.Callable or typing.get_origin(tp) is collections.abc.Callable or tp is typing.Callable


def coerce(value: Any, tp: Any, *, build: bool = True, path: str = "") -> Any:
    """Convert ``value`` to annotation ``tp``.

    Args:
        value: A parsed YAML / command-line value (or an object already of the right type).
        tp: The field's resolved annotation.
        build: Build dataclasses from mappings (False only checks, for :func:`conforms`).
        path: Dotted name of the value, for the messages of nested dataclasses.

    Returns:
        The converted value.

    Raises:
        CoercionError: if ``value`` cannot be read as ``tp``; the message names the expected type.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        if build and isinstance(value, dict) and TARGET_KEY in value:
            return build_dataclass(object, value, path)
        return value
    if value is None:
        if tp is type(None) or (origin in (Union, types.UnionType) and type(None) in args):
            return None
        raise CoercionError(f"expected {describe(tp)}, got null")
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, build, path)
    if origin is Literal:
        return _coerce_literal(value, args)
    if tp is bool:
        return _coerce_bool(value)
    if tp is int:
        return _coerce_int(value)
    if tp is float:
        return _coerce_float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise CoercionError(f"expected a string, got {_show(value)}")
    if tp is torch.dtype:
        return _coerce_dtype(value)
    if tp is pathlib.Path or tp is pathlib.PurePath:
        if isinstance(value, str | pathlib.PurePath):
            return pathlib.Path(value)
        raise CoercionError(f"expected a path, got {_show(value)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _coerce_enum(value, tp)
    if _is_callable_type(tp):
        return _coerce_callable(value)
    if origin in (list, collections.abc.Sequence, collections.abc.MutableSequence) or tp is list:
        if isinstance(value, list | tuple):
            item = args[0] if args else Any
            return [_item(coerce, v, item, build, i) for i, v in enumerate(value)]
        raise CoercionError(f"expected a list ({describe(tp)}), got {_show(value)}; write it as [a, b]")
    if origin is tuple or tp is tuple:
        return _coerce_tuple(value, tp, args, build)
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping) or tp is dict:
        if isinstance(value, dict):
            key_tp, val_tp = args if args else (Any, Any)
            return {coerce(k, key_tp): _item(coerce, v, val_tp, build, k) for k, v in value.items()}
        raise CoercionError(f"expected a mapping ({describe(tp)}), got {_show(value)}")
    if origin is type or tp is type:
        obj = import_object(value) if isinstance(value, str) else value
        if isinstance(obj, type):
            return obj
        raise CoercionError(f"expected a class or its import path, got {_show(value)}")
    if isinstance(tp, type):
        if isinstance(value, dict) and (dataclasses.is_dataclass(tp) or is_protocol(tp) or TARGET_KEY in value):
            if not build:
                raise CoercionError(f"expected a {tp.__name__} object, got a mapping")
            return build_dataclass(tp, value, path)
        if is_protocol(tp):
            if getattr(tp, "_is_runtime_protocol", False) and not isinstance(value, tp):
                raise CoercionError(f"expected an object implementing {tp.__name__}, got {_show(value)}")
            return value
        if isinstance(value, tp):
            return value
        raise CoercionError(f"expected {describe(tp)}, got {_show(value)}")
    if origin is not None and isinstance(origin, type):
        # Other generic aliases (e.g. typing.ContextManager[...]): an isinstance check on the origin.
        if isinstance(value, origin):
            return value
        raise CoercionError(f"expected {describe(tp)}, got {_show(value)}")
    return value


def conforms(value: Any, tp: Any) -> bool:
    """True when ``value`` already is of annotation ``tp`` (ints are accepted for floats); nothing is converted."""
    try:
        converted = coerce(value, tp, build=False)
    except (CoercionError, ImportError):
        return False
    if isinstance(value, str) and not isinstance(converted, str):
        return False  # "10" for an int field, "bfloat16" for a dtype: right text, wrong type
    if isinstance(value, bool) != isinstance(converted, bool):
        return False
    return not (isinstance(value, list | tuple) and type(converted) is not type(value))


def _item(fn, value, tp, build, where):
    try:
        return fn(value, tp, build=build)
    except CoercionError as err:
        raise CoercionError(f"item {where!r}: {err}") from None


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce_union(value: Any, args: tuple, build: bool, path: str) -> Any:
    members = [a for a in args if a is not type(None)]
    # First a member the value already is (so 5 stays 5 for ``int | str``), then conversions in order.
    for member in members:
        if isinstance(member, type) and not dataclasses.is_dataclass(member) and not is_protocol(member) \
                and type(value) is member:
            return value
    for member in members:
        try:
            return coerce(value, member, build=build, path=path)
        except (CoercionError, ImportError):
            if isinstance(value, dict) and (dataclasses.is_dataclass(member) or is_protocol(member)):
                raise  # the mapping was meant for this member: its own messages are the useful ones
    raise CoercionError(f"expected {describe(Union[args])}, got {_show(value)}")  # noqa: UP007


def _coerce_literal(value: Any, choices: tuple) -> Any:
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return choice
        if isinstance(choice, enum.Enum) and (value == choice.name or value == choice.value):
            return choice
    for choice in choices:  # "2" for Literal[2], 2 for Literal["2"]
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value) == str(choice):
            return choice
    if isinstance(value, str):  # "wsd" for "WSD", when only one choice matches
        folded = [c for c in choices if isinstance(c, str) and c.lower() == value.lower()]
        if len(folded) == 1:
            return folded[0]
    raise CoercionError(f"expected one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise CoercionError(f"expected a bool (true/false), got {_show(value)}")


def _coerce_int(value: Any) -> int:
    if isinstance(value, bool):
        raise CoercionError(f"expected an int, got {_show(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.replace("_", ""))
    raise CoercionError(f"expected an int, got {_show(value)}")


def _coerce_float(value: Any) -> float:
    if isinstance(value, bool):
        raise CoercionError(f"expected a float, got {_show(value)}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    raise CoercionError(f"expected a float, got {_show(value)}")


def _coerce_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        dtype = _DTYPE_ALIASES.get(name, getattr(torch, name, None))
        if isinstance(dtype, torch.dtype):
            return dtype
    raise CoercionError(f"expected a torch dtype name (e.g. bfloat16, float16, float32), got {_show(value)}")


def _coerce_enum(value: Any, tp: type[enum.Enum]) -> enum.Enum:
    if isinstance(value, tp):
        return value
    if isinstance(value, str):
        if value in tp.__members__:
            return tp[value]
        folded = {name.lower(): member for name, member in tp.__members__.items()}
        if value.lower() in folded:
            return folded[value.lower()]
    with contextlib.suppress(ValueError):
        return tp(value)
    raise CoercionError(f"expected one of {[m.name for m in tp]}, got {_show(value)}")


def _coerce_callable(value: Any) -> Any:
    if isinstance(value, str):
        try:
            obj = import_object(value)
        except ImportError as err:
            raise CoercionError(f"expected a callable's import path: {err}") from None
        if callable(obj):
            return obj
        raise CoercionError(f"{value!r} imports {obj!r}, which is not callable")
    if callable(value) and not isinstance(value, dict):
        return value
    raise CoercionError(f"expected a callable's import path (e.g. torch.nn.functional.silu), got {_show(value)}")


def _coerce_tuple(value: Any, tp: Any, args: tuple, build: bool) -> tuple:
    if not isinstance(value, list | tuple):
        raise CoercionError(f"expected a list ({describe(tp)}), got {_show(value)}; write it as [a, b]")
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_item(coerce, v, args[0], build, i) for i, v in enumerate(value))
    if len(args) != len(value):
        raise CoercionError(f"expected {len(args)} items ({describe(tp)}), got {len(value)}")
    return tuple(_item(coerce, v, a, build, i) for i, (v, a) in enumerate(zip(value, args)))


def build_dataclass(tp: Any, data: dict, path: str = "") -> Any:
    """Build the dataclass that ``data`` describes; ``data[_target_]`` names the class when given.

    Args:
        tp: The annotated type (a dataclass, a Protocol, or Any/object).
        data: Field values as parsed from YAML; nested mappings are built recursively.
        path: Dotted name of this node, for messages.

    Returns:
        The object, or a :class:`NotRestorable` for a saved ``{_target_, _repr_}`` record.

    Raises:
        CoercionError: listing every unknown key, missing required field and bad value below this node.
    """
    from .suggest import unknown_key_message  # local: suggest imports this module

    data = dict(data)
    target = data.pop(TARGET_KEY, None)
    if REPR_KEY in data:
        return NotRestorable(target=str(target), repr=str(data.pop(REPR_KEY)))
    cls = tp
    if target is not None:
        try:
            cls = import_object(target)
        except ImportError as err:
            raise CoercionError(f"{_at(path, TARGET_KEY)}: {err}") from None
        if not isinstance(cls, type):
            raise CoercionError(f"{_at(path, TARGET_KEY)}: {target!r} is not a class")
        if isinstance(tp, type) and not is_protocol(tp) and tp is not object and not issubclass(cls, tp):
            raise CoercionError(f"{_at(path, TARGET_KEY)}: {target!r} is not a subclass of {tp.__name__}")
    if not dataclasses.is_dataclass(cls):
        raise CoercionError(f"{path or 'value'}: {describe(tp)} needs {TARGET_KEY}: <import path of a dataclass>"
                            if not isinstance(cls, type) or is_protocol(cls) or cls is object
                            else f"{path or 'value'}: {cls.__name__} is not a dataclass and cannot be built from YAML")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = field_type_hints(cls)
    problems, kwargs = [], {}
    for key, value in data.items():
        if key not in fields:
            problems.append(unknown_key_message(_at(path, key), [_at(path, name) for name in fields]))
            continue
        try:
            kwargs[key] = coerce_field(fields[key], hints.get(key, Any), value, _at(path, key))
        except CoercionError as err:
            problems.append(str(err))
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
                and not any(p.startswith(f"{_at(path, name)} ") for p in problems):
            problems.append(f"{_at(path, name)} is required ({describe(hints.get(name, Any))}) but missing")
    if problems:
        raise CoercionError("\n".join(problems))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise CoercionError(f"{path or cls.__name__}: cannot build {cls.__name__}: {err}") from None
    if is_protocol(tp) and getattr(tp, "_is_runtime_protocol", False) and not isinstance(obj, tp):
        raise CoercionError(f"{path}: {cls.__name__} does not implement {tp.__name__}")
    return obj


def coerce_field(f: dataclasses.Field, tp: Any, value: Any, path: str) -> Any:
    """:func:`coerce` for one dataclass field; the message names ``path``, the value and the expected type.

    megatron-core annotates some fields without ``Optional`` but defaults them to None
    (``pipeline_dtype: torch.dtype = None``); None stays allowed there.
    """
    if value is None and f.default is None:
        return None
    try:
        return coerce(value, tp, path=path)
    except CoercionError as err:
        text = str(err)
        if "\n" in text or text.startswith(f"{path}"):
            raise  # already names nested fields
        raise CoercionError(f"{path}: cannot use {value!r}: {text}") from None


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
