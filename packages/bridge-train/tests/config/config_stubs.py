"""Stand-ins for other packages' configs and the tiny provider, importable by path (YAML ``_target_``).

Kept out of conftest.py so that tests and YAML documents can name them as ``config_stubs.X``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge_convert.provider import GPTModelProvider


@dataclass(kw_only=True, slots=True)
class MockDataConfig:
    """Stand-in for bridge-data's dataset configs: only the ``build(tokenizer, ...)`` interface matters."""

    seq_length: int = 32
    """Tokens per sample."""
    seed: int = 0
    """Data order seed."""

    def build(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("config tests never build datasets")


@dataclass
class PaddedDataConfig(MockDataConfig):
    """A dataset config whose rows are padded to a multiple (as bridge-data's SFT configs)."""

    pad_to_multiple_of: int = 1
    """Row / document length multiple."""


@dataclass(kw_only=True, slots=True)
class IndexedDataStub(MockDataConfig):
    """Stand-in for bridge-data's PretrainDataConfig on real data: the fields the container's rules read."""

    paths: list[str]
    """Indexed dataset prefixes."""
    mock: bool = False
    """Random tokens instead."""
    eod_mask_loss: bool = False
    """No loss on the token after an eod."""


@dataclass(kw_only=True, slots=True)
class TokenizerStub:
    """Stand-in for bridge-data's TokenizerConfig, with a finalize() that rejects a missing vocab size."""

    vocab_size: int | None = 128
    """Vocabulary size."""

    def finalize(self) -> None:
        if self.vocab_size is None:
            raise ValueError("Invalid TokenizerConfig: tokenizer_type='null' needs vocab_size")


def tiny_provider(**overrides: Any) -> GPTModelProvider:
    """The tiny shape (2 layers, hidden 64, 4 heads, 2 KV groups, vocab 128, seq 32), unfinalized."""
    values = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                  vocab_size=128, seq_length=32)
    values.update(overrides)
    return GPTModelProvider(**values)


@dataclass
class FakeLoRA:
    """A PEFT method stand-in: ``peft(model, training) -> model``."""

    dim: int = 8
    """Adapter rank."""

    def __call__(self, model: Any, training: bool = True) -> Any:
        return model

    def validate(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"FakeLoRA.dim must be > 0, got {self.dim}")


@dataclass
class FakeDoRA(FakeLoRA):
    """A second PEFT method stand-in, registered as ``dora``."""

    magnitude: bool = True
    """Learn a magnitude vector."""
