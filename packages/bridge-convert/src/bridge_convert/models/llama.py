"""Llama 3, 3.1 (llama3 RoPE scaling) and 3.2 (tied embeddings): ``LlamaForCausalLM``."""

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


def llama_config_to_provider(raw: dict[str, Any]) -> dict[str, Any]:
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        # HF puts attention_bias on q/k/v *and* o_proj, and mlp_bias on gate/up/down; megatron-core's switches are
        # "q/k/v only" (add_qkv_bias) or "every linear" (add_bias_linear), so neither maps exactly.
        raise ValueError("LlamaForCausalLM with attention_bias or mlp_bias is not supported: megatron-core cannot "
                         "put biases on exactly those layers (Llama 3 checkpoints have none)")
    return dense_config_to_provider(raw, default_rope_theta=10000.0, max_position_embeddings=2048)


def llama_provider_to_config(provider: GPTModelProvider, source: dict[str, Any] | None) -> dict[str, Any]:
    raw = dense_provider_to_config(provider, source, architecture="LlamaForCausalLM", model_type="llama")
    raw.setdefault("attention_bias", False)
    raw.setdefault("mlp_bias", False)
    return raw


LLAMA = ModelBridge(
    hf_architecture="LlamaForCausalLM",
    hf_model_type="llama",
    mappings=dense_decoder_mappings(),
    config_to_provider=llama_config_to_provider,
    provider_to_config=llama_provider_to_config,
    ignore_hf=IGNORE_HF,
)
