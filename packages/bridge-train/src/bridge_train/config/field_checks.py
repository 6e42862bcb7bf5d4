"""Small checks shared by the sub-configs' ``check()`` methods; each returns a message or None."""

from __future__ import annotations

import dataclasses
from typing import Any

from .coerce import conforms, describe, field_type_hints

__all__ = ["at_least", "type_problems"]


def at_least(name: str, value: Any, minimum: int | float, *, optional: bool = False) -> str | None:
    """``"train.train_iters must be >= 1, got 0"`` when ``value < minimum`` (None allowed when ``optional``)."""
    if value is None:
        return None if optional else f"{name} must be set (>= {minimum})"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # type_problems reports it
    if value < minimum:
        fix = "; set it to null to disable" if optional else ""
        return f"{name} must be >= {minimum}, got {value}{fix}"
    return None


def type_problems(obj: Any, prefix: str, names: tuple[str, ...] | None = None) -> list[str]:
    """Fields of dataclass ``obj`` whose value does not match the annotation (e.g. ``"10"`` for an int).

    Values set through YAML or overrides are already converted; this catches Python assignments
    (``cfg.train.train_iters = "10"``) before a comparison deep in a check raises TypeError.
    """
    hints = field_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        if not f.init or (names is not None and f.name not in names):
            continue
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        if not conforms(value, hints.get(f.name, Any)):
            problems.append(f"{prefix}.{f.name} must be {describe(hints[f.name])}, got {value!r} "
                            f"({type(value).__name__})")
    return problems
