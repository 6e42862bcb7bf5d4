"""The one place where model bridges are listed, keyed by HF architecture name."""

from __future__ import annotations

from .model_bridge import ModelBridge
from .models.llama import LLAMA
from .models.mistral import MISTRAL
from .models.qwen import QWEN2, QWEN3

__all__ = ["BRIDGES", "get_bridge", "supported_architectures"]

BRIDGES: dict[str, ModelBridge] = {b.hf_architecture: b for b in (LLAMA, QWEN2, QWEN3, MISTRAL)}


def supported_architectures() -> list[str]:
    return sorted(BRIDGES)


def get_bridge(architecture: str) -> ModelBridge:
    """The bridge for an HF architecture name (``config.json``'s ``architectures[0]``).

    Raises:
        ValueError: for an unsupported architecture, listing the supported ones.
    """
    if architecture not in BRIDGES:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {supported_architectures()}")
    return BRIDGES[architecture]
