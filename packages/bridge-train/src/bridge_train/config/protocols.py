"""The narrow interfaces bridge-train uses for things other packages own, and PEFT methods by name.

bridge-train never imports bridge-peft and does not depend on the exact fields of bridge-data's configs: a dataset
config is anything with ``build(tokenizer, ...)``, a tokenizer config is whatever bridge-data's
``build_tokenizer`` takes, and a PEFT method is a callable ``peft(model, training) -> model``. So that ``peft=lora``
works in overrides and YAML, the package that knows the methods registers them (bridge-recipes registers
bridge-peft's LoRA and DoRA): ``register_peft_method("lora", LoRA)``, a callable returning a PeftLike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .errors import unknown_name_message

__all__ = ["DatasetConfigLike", "PeftLike", "TokenizerConfigLike", "peft_method", "peft_method_names",
           "register_peft_method"]


@runtime_checkable
class DatasetConfigLike(Protocol):
    """A dataset config (``bridge_data.PretrainDataConfig``, ``SFTDataConfig``, mock data): builds the datasets."""

    def build(self, tokenizer: Any, *args: Any, **kwargs: Any) -> Any:
        """Build the train / validation / test datasets for ``tokenizer``."""
        ...


@runtime_checkable
class TokenizerConfigLike(Protocol):
    """A tokenizer config (``bridge_data.TokenizerConfig``): any object; a dataclass one round-trips through YAML."""


@runtime_checkable
class PeftLike(Protocol):
    """A PEFT method: ``peft(model, training)`` returns the model with adapters applied; an optional
    ``save_hf(bridge, model, path)`` makes ``checkpoint.save_hf`` write its adapters in an HF form, an optional
    ``validate()`` (raising ValueError) is part of the config check, before anything is built, and an optional
    ``check_targets(model)`` runs on the fresh model before the pretrained weights load."""

    def __call__(self, model: Any, training: bool = True) -> Any:
        """Apply the method to ``model`` (a list of model chunks)."""
        ...


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
        raise ValueError(f"unknown PEFT method {name!r}: none is registered (`import bridge_recipes` registers lora, "
                         "dora and canonical_lora); import it, or set cfg.peft to a PEFT object in Python")
    raise ValueError(unknown_name_message("PEFT method", name, peft_method_names()))
