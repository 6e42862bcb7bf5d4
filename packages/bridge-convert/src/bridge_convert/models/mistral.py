"""Mistral (7B v0.1 with a 4096-token sliding window, v0.3 without): ``MistralForCausalLM``."""

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


MISTRAL_DEFAULT_SLIDING_WINDOW = 4096
"""``sliding_window`` of a Mistral config.json that does not name one, as transformers reads it."""


def mistral_config_to_provider(raw: dict[str, Any]) -> dict[str, Any]:
    kwargs = dense_config_to_provider(raw, default_rope_theta=10000.0, max_position_embeddings=131072,
                                      num_key_value_heads=8)
    # a config without the key gets transformers' MistralConfig default (4096, what Mistral 7B v0.1 uses); an
    # explicit null means full attention
    window = raw.get("sliding_window", MISTRAL_DEFAULT_SLIDING_WINDOW)
    if window is not None:
        # HF lets token i attend to j in (i - window, i]; megatron-core's window_size=(left, right) allows
        # [i - left, i + right].
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(f"config.json: sliding_window is {window!r}; it must be a positive integer or null")
        kwargs["window_size"] = (window - 1, 0)
    return kwargs


def mistral_provider_to_config(provider: GPTModelProvider, source: dict[str, Any] | None) -> dict[str, Any]:
    raw = dense_provider_to_config(provider, source, architecture="MistralForCausalLM", model_type="mistral")
    window = provider.window_size
    if window is not None and (window[1] != 0 or provider.window_attn_skip_freq is not None):
        raise ValueError(f"window_size={window} (with skip frequency {provider.window_attn_skip_freq}) cannot be "
                         "written as a Mistral sliding_window")
    raw["sliding_window"] = None if window is None else int(window[0]) + 1
    return raw


MISTRAL = ModelBridge(
    hf_architecture="MistralForCausalLM",
    hf_model_type="mistral",
    mappings=dense_decoder_mappings(),
    config_to_provider=mistral_config_to_provider,
    provider_to_config=mistral_provider_to_config,
    ignore_hf=IGNORE_HF,
)
