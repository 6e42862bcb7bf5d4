"""The narrow interfaces bridge-train uses for things other packages own.

bridge-train never imports bridge-peft and does not depend on the exact fields of bridge-data's configs: a dataset
config is anything with ``build(tokenizer, ...)``, a tokenizer config is whatever bridge-data's
``build_tokenizer`` takes, and a PEFT method is a callable ``peft(model, training) -> model``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["DatasetConfigLike", "PeftLike", "TokenizerConfigLike"]


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
    """A PEFT method: ``peft(model, training)`` returns the model with adapters applied."""

    def __call__(self, model: Any, training: bool = True) -> Any:
        """Apply the method to ``model`` (a list of model chunks)."""
        ...
