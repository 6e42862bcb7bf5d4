"""Qwen2 (QKV bias) and Qwen3 (q/k RMSNorm, explicit head_dim): ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..model_bridge import ModelBridge
from ._dense_decoder import (
    IGNORE_HF,
    dense_config_to_provider,
    dense_decoder_mappings,
    dense_provider_to_config,
)

if TYPE_CHECKING:
    from ..provider import GPTModelProvider


def _no_sliding_window(raw: dict[str, Any], arch: str) -> None:
    if raw.get("use_sliding_window"):
        raise ValueError(f"{arch} with use_sliding_window=True is not supported (its per-layer window schedule, "
                         "max_window_layers, has no megatron-core equivalent)")


def qwen2_config_to_provider(raw: dict[str, Any]) -> dict[str, Any]:
    _no_sliding_window(raw, "Qwen2ForCausalLM")
    return dense_config_to_provider(raw, qkv_bias=True, default_rope_theta=10000.0,
                                    max_position_embeddings=32768, num_key_value_heads=32)


def qwen2_provider_to_config(provider: GPTModelProvider, source: dict[str, Any] | None) -> dict[str, Any]:
    raw = dense_provider_to_config(provider, source, architecture="Qwen2ForCausalLM", model_type="qwen2",
                                   qkv_bias=True, head_dim_key=False)
    raw.setdefault("use_sliding_window", False)
    return raw


def qwen3_config_to_provider(raw: dict[str, Any]) -> dict[str, Any]:
    _no_sliding_window(raw, "Qwen3ForCausalLM")
    if raw.get("attention_bias"):
        raise ValueError("Qwen3ForCausalLM with attention_bias=True is not supported (bias on o_proj too)")
    return dense_config_to_provider(raw, qk_norm=True, default_rope_theta=10000.0,
                                    max_position_embeddings=32768, num_key_value_heads=32, head_dim=128)


def qwen3_provider_to_config(provider: GPTModelProvider, source: dict[str, Any] | None) -> dict[str, Any]:
    raw = dense_provider_to_config(provider, source, architecture="Qwen3ForCausalLM", model_type="qwen3",
                                   qk_norm=True)
    raw.setdefault("attention_bias", False)
    raw.setdefault("use_sliding_window", False)
    return raw


QWEN2 = ModelBridge(
    hf_architecture="Qwen2ForCausalLM",
    hf_model_type="qwen2",
    mappings=dense_decoder_mappings(qkv_bias=True),
    config_to_provider=qwen2_config_to_provider,
    provider_to_config=qwen2_provider_to_config,
    ignore_hf=IGNORE_HF,
)

QWEN3 = ModelBridge(
    hf_architecture="Qwen3ForCausalLM",
    hf_model_type="qwen3",
    mappings=dense_decoder_mappings(qk_norm=True),
    config_to_provider=qwen3_config_to_provider,
    provider_to_config=qwen3_provider_to_config,
    ignore_hf=IGNORE_HF,
)
