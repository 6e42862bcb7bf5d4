"""PEFT methods by name, so ``peft=lora`` works in overrides and YAML while bridge-train never imports bridge-peft.

The package that knows the methods registers them (bridge-recipes registers bridge-peft's LoRA and DoRA):

    register_peft_method("lora", LoRA)        # any callable returning a PeftLike, called with no arguments

Then ``apply_overrides(cfg, ["peft=lora", "peft.dim=16"])`` sets ``cfg.peft = LoRA()`` and edits its field.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import unknown_name_message
from .protocols import PeftLike

__all__ = ["peft_method", "peft_method_names", "register_peft_method"]

_METHODS: dict[str, Callable[[], PeftLike]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_peft_method(name: str, factory: Callable[[], PeftLike]) -> None:
    """Make ``peft=<name>`` build ``factory()`` (a fresh object each time).

    Registering the same factory twice is a no-op (a module imported twice); another factory under a taken name
    is an error, so two packages cannot silently shadow each other.

    Raises:
        ValueError: for a name that is not lower-case ``[a-z][a-z0-9_]*``, a taken name, or a non-callable.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"PEFT method name {name!r} must be lower-case letters, digits and '_' (e.g. 'lora')")
    if not callable(factory):
        raise ValueError(f"PEFT method {name!r}: factory {factory!r} is not callable")
    if _METHODS.get(name, factory) is not factory:
        raise ValueError(f"PEFT method {name!r} is already registered ({_METHODS[name]!r}); pick another name")
    _METHODS[name] = factory


def peft_method_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_METHODS)


def peft_method(name: str) -> PeftLike:
    """A fresh PEFT object for a registered name (case-insensitive, ``-`` read as ``_``).

    Raises:
        ValueError: for an unknown name; the message names the closest one and every registered name.
    """
    key = name.strip().lower().replace("-", "_")
    if key in _METHODS:
        return _METHODS[key]()
    if not _METHODS:
        raise ValueError(f"unknown PEFT method {name!r}: none is registered (bridge-recipes registers lora and dora "
                         "when imported); import it, or set cfg.peft to a PEFT object in Python")
    raise ValueError(unknown_name_message("PEFT method", name, peft_method_names()))
