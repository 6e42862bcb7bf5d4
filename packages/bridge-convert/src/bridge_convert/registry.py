"""The one place where model bridges are listed, keyed by HF architecture name."""

from __future__ import annotations

from .model_bridge import ModelBridge
from .models.llama import LLAMA
from .models.mistral import MISTRAL
from .models.qwen import QWEN2, QWEN3

__all__ = ["BRIDGES", "bridge_for_config", "get_bridge", "supported_architectures"]

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


def bridge_for_config(config: dict) -> ModelBridge:
    """The bridge for an HF ``config.json``: its ``architectures[0]``, else (a config written without it) the
    architecture its ``model_type`` names, as transformers' ``AutoModelForCausalLM`` picks it.

    Raises:
        ValueError: for an unsupported architecture or model type, listing the supported ones.
    """
    architectures = config.get("architectures") or []
    if architectures:
        return get_bridge(architectures[0])
    by_type = {b.hf_model_type: b for b in BRIDGES.values() if b.hf_model_type}
    if config.get("model_type") in by_type:
        return by_type[config["model_type"]]
    raise ValueError(f"the HF config names no architecture ('architectures') and model_type "
                     f"{config.get('model_type')!r} is none of {sorted(by_type)}; supported: {supported_architectures()}")
