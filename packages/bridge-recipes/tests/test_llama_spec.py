"""The shipped config.json of every model holds the public HF values (written here as literals)."""

from __future__ import annotations

import pytest

from bridge_recipes.llama import SPECS, hf_config

# name: (layers, hidden, heads, kv heads, FFN, max positions, llama3 rope factor or None, tied, head_dim)
HF_VALUES = {
    "Llama-3.2-1B": (16, 2048, 32, 8, 8192, 131072, 32.0, True, 64),
    "Llama-3.2-3B": (28, 3072, 24, 8, 8192, 131072, 32.0, True, 128),
    "Meta-Llama-3-8B": (32, 4096, 32, 8, 14336, 8192, None, False, 128),
    "Meta-Llama-3-70B": (80, 8192, 64, 8, 28672, 8192, None, False, 128),
    "Llama-3.1-8B": (32, 4096, 32, 8, 14336, 131072, 8.0, False, 128),
    "Llama-3.1-70B": (80, 8192, 64, 8, 28672, 131072, 8.0, False, 128),
    "Llama-3.1-405B": (126, 16384, 128, 8, 53248, 131072, 8.0, False, 128),
}


@pytest.mark.parametrize("name", sorted(HF_VALUES))
def test_shipped_config_json_has_the_public_values(name):
    raw = hf_config(name)
    layers, hidden, heads, kv, ffn, positions, factor, tied, head_dim = HF_VALUES[name]
    assert (raw["num_hidden_layers"], raw["hidden_size"], raw["num_attention_heads"]) == (layers, hidden, heads)
    assert (raw["num_key_value_heads"], raw["intermediate_size"]) == (kv, ffn)
    assert raw["max_position_embeddings"] == positions and raw["tie_word_embeddings"] is tied
    assert raw.get("head_dim", hidden // heads) == head_dim
    assert raw["vocab_size"] == 128256 and raw["rope_theta"] == 500000.0 and raw["rms_norm_eps"] == 1e-5
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["hidden_act"] == "silu"
    assert (raw["bos_token_id"], raw["eos_token_id"], raw["torch_dtype"]) == (128000, 128001, "bfloat16")
    if factor is None:
        assert raw["rope_scaling"] is None
    else:
        assert raw["rope_scaling"] == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_every_recipe_model_is_shipped_and_copies_are_independent():
    assert sorted(spec.display_name for spec in SPECS.values()) == sorted(HF_VALUES)
    raw = hf_config("Llama-3.2-1B")
    raw["num_hidden_layers"] = 2
    assert hf_config("Llama-3.2-1B")["num_hidden_layers"] == 16
    with pytest.raises(KeyError, match="known: Llama-3.1-405B"):
        hf_config("Llama-2-7B")
