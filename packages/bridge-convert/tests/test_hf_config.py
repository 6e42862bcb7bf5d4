"""HF config <-> provider translation as pure functions on literal config dicts."""

import json

import pytest
import torch

from bridge_convert.hf_config import RopeSettings, read_rope, write_rope
from bridge_convert.models.llama import LLAMA
from bridge_convert.models.mistral import MISTRAL
from bridge_convert.models.qwen import QWEN2, QWEN3
from bridge_convert.provider import GPTModelProvider

# The hub's config.json of Llama-3.2-1B, as a literal: bridge-recipes ships the models' configs, but bridge-convert's
# tests cannot depend on it.
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.45.0",
    "use_cache": True, "vocab_size": 128256,
}



def test_llama32_1b_config_to_provider():
    kw = LLAMA.config_to_provider(LLAMA_32_1B)
    assert (kw["num_layers"], kw["hidden_size"], kw["ffn_hidden_size"]) == (16, 2048, 8192)
    assert (kw["num_attention_heads"], kw["num_query_groups"], kw["kv_channels"]) == (32, 8, 64)
    assert kw["vocab_size"] == 128256 and kw["seq_length"] == 131072 and kw["layernorm_epsilon"] == 1e-5
    assert kw["rotary_base"] == 500000.0 and kw["rope_scaling"] and kw["rope_scaling_factor"] == 32.0
    assert kw["rope_scaling_original_max_position_embeddings"] == 8192
    assert kw["share_embeddings_and_output_weights"] and kw["params_dtype"] == torch.bfloat16


def test_llama_config_roundtrips_through_provider():
    provider = GPTModelProvider(**LLAMA.config_to_provider(LLAMA_32_1B))
    back = LLAMA.provider_to_config(provider, LLAMA_32_1B)
    assert back == LLAMA_32_1B


@pytest.mark.parametrize(("bridge", "model_type"), [(LLAMA, "llama"), (QWEN2, "qwen2"), (QWEN3, "qwen3"),
                                                   (MISTRAL, "mistral")], ids=lambda b: getattr(b, "hf_architecture", b))
def test_a_run_sequence_length_is_not_the_models_context(bridge, model_type):
    """Training at seq 4096 (model.seq_length) does not make a 131072-position model a 4096 one: the exported
    config keeps the source's max_position_embeddings (vLLM serves up to it); a longer run raises it."""
    source = {**LLAMA_32_1B, "architectures": [bridge.hf_architecture], "model_type": model_type,
              "tie_word_embeddings": False}
    if bridge is QWEN2:
        source["use_sliding_window"] = False
    provider = GPTModelProvider(**bridge.config_to_provider(source))
    provider.seq_length = 4096
    assert bridge.provider_to_config(provider, source)["max_position_embeddings"] == 131072
    provider.seq_length = 262144
    assert bridge.provider_to_config(provider, source)["max_position_embeddings"] == 262144


def test_token_ids_a_smaller_vocab_leaves_out_are_written_as_null():
    """A recipe's Llama-3.2-1B config shrunk to 256 tokens kept bos 128000 / eos 128001, which transformers warns
    about on every load (its own check is the oracle); ids inside the new vocabulary, and the source's own invalid
    ones (pad -1, as some Hub configs have), stay as they were."""
    import copy
    import logging

    import transformers

    source = {**copy.deepcopy(LLAMA_32_1B), "eos_token_id": [128001, 7, 128009], "pad_token_id": -1, "sep_token_id": 5,
              "unk_token_id": None}
    provider = GPTModelProvider(**LLAMA.config_to_provider(source))
    provider.vocab_size = 256
    with pytest.warns(UserWarning, match=r"bos_token_id 128000, eos_token_id \[128001, 7, 128009\] \(from the "
                                         r"source config\) are outside its vocabulary of 256 tokens"):
        raw = LLAMA.provider_to_config(provider, source)
    assert (raw["bos_token_id"], raw["eos_token_id"], raw["pad_token_id"], raw["sep_token_id"], raw["unk_token_id"]) == (None, 7, -1, 5, None)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    transformers.utils.logging.warning_once.cache_clear()  # it says each message once per process
    try:
        # (transformers edits the rope dict it is given: copies)
        transformers.LlamaConfig(**copy.deepcopy({k: v for k, v in raw.items() if k != "pad_token_id"}))
        transformers.LlamaConfig(**copy.deepcopy({**source, "vocab_size": 256, "pad_token_id": None}))  # it warns
    finally:
        hf_logger.removeHandler(handler)
    assert [r.getMessage().split(",")[0] for r in records] == [
        "Model config: bos_token_id must be `None` or an integer within the vocabulary (between 0 and 255)"]


def test_provider_without_source_writes_a_complete_config():
    provider = GPTModelProvider(**LLAMA.config_to_provider(LLAMA_32_1B))
    raw = LLAMA.provider_to_config(provider, None)
    again = LLAMA.config_to_provider(raw)
    assert again == LLAMA.config_to_provider(LLAMA_32_1B)


def test_qwen2_has_qkv_bias_and_qwen3_has_qk_norm():
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "hidden_act": "silu"}
    assert QWEN2.config_to_provider({**base, "architectures": ["Qwen2ForCausalLM"]})["add_qkv_bias"]
    q3 = QWEN3.config_to_provider({**base, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert q3["qk_layernorm"] and q3["kv_channels"] == 32 and not q3["add_qkv_bias"]


def test_mistral_sliding_window_maps_to_megatron_window():
    base = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "sliding_window": 4096}
    kw = MISTRAL.config_to_provider(base)
    assert kw["window_size"] == (4095, 0)
    assert MISTRAL.provider_to_config(GPTModelProvider(**kw), base)["sliding_window"] == 4096


@pytest.mark.parametrize("window", ["absent", None, 7])
def test_mistral_window_is_the_one_transformers_reads(window, tmp_path):
    """A config.json without ``sliding_window`` gets transformers' default (4096), an explicit null none; the
    export writes the window back, so transformers reads the same model from it."""
    from transformers import AutoConfig

    raw = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 100, **({} if window == "absent" else {"sliding_window": window})}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    expected = AutoConfig.from_pretrained(tmp_path).sliding_window
    kw = MISTRAL.config_to_provider(raw)
    assert kw.get("window_size") == (None if expected is None else (expected - 1, 0))
    exported = MISTRAL.provider_to_config(GPTModelProvider(**kw), raw)
    (tmp_path / "config.json").write_text(json.dumps(exported))
    assert AutoConfig.from_pretrained(tmp_path).sliding_window == expected


FAMILIES = [(LLAMA, "llama"), (QWEN2, "qwen2"), (QWEN3, "qwen3"), (MISTRAL, "mistral")]


@pytest.mark.parametrize(("bridge", "model_type"), FAMILIES, ids=lambda b: getattr(b, "hf_architecture", b))
def test_keys_a_config_leaves_out_mean_what_transformers_reads(bridge, model_type, tmp_path):
    """No max_position_embeddings / num_key_value_heads / head_dim: each family's transformers defaults differ
    (Llama 2048 positions, Qwen 32768 and 32 KV heads, Qwen3 head_dim 128, Mistral 131072 and 8 KV heads)."""
    from transformers import AutoConfig

    raw = {"architectures": [bridge.hf_architecture], "model_type": model_type, "hidden_size": 2048,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 32, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = AutoConfig.from_pretrained(tmp_path)
    expected = (hf.max_position_embeddings, hf.num_key_value_heads, getattr(hf, "head_dim", None) or 2048 // 32)
    kw = bridge.config_to_provider(raw)
    assert (kw["seq_length"], kw["num_query_groups"], kw["kv_channels"]) == expected
    (tmp_path / "config.json").write_text(json.dumps(bridge.provider_to_config(GPTModelProvider(**kw), raw)))
    back = AutoConfig.from_pretrained(tmp_path)
    assert (back.max_position_embeddings, back.num_key_value_heads, getattr(back, "head_dim", None) or 64) == expected


@pytest.mark.parametrize("raw,message", [
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling.factor is missing; it must be a positive number"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": None}}, "rope_scaling.factor is None"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": 0.5}},
     "original_max_position_embeddings is 0.5; it must be a positive integer"),
    ({"rope_scaling": "linear"}, "rope_scaling is 'linear'; it must be an object"),
    ({"rope_theta": -1.0}, "rope_theta is -1.0"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(3\)"),
    ({"num_hidden_layers": 0}, "num_hidden_layers is 0; it must be a positive integer"),
    ({"hidden_size": "2048"}, "hidden_size is '2048'"),
    ({"vocab_size": 1.5}, "vocab_size is 1.5"),
    ({"head_dim": None, "hidden_size": 2050}, r"hidden_size \(2050\) is not a multiple of num_attention_heads"),
])
def test_bad_config_values_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        LLAMA.config_to_provider({**LLAMA_32_1B, **raw})


def test_a_mistral_window_that_is_not_a_size_is_named():
    base = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    with pytest.raises(ValueError, match="sliding_window is 0"):
        MISTRAL.config_to_provider({**base, "sliding_window": 0})


@pytest.mark.parametrize("raw,message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias or mlp_bias is not supported"),
])
def test_unsupported_settings_are_refused(raw, message):
    with pytest.raises(ValueError, match=message):
        LLAMA.config_to_provider({**LLAMA_32_1B, **raw})


def test_read_rope_both_layouts():
    legacy = read_rope({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    new = read_rope({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    assert legacy.legacy_layout and not new.legacy_layout
    assert (legacy.theta, legacy.factor, legacy.original_max_position_embeddings) == (5e5, 8.0, 8192)
    assert (new.theta, new.factor, new.low_freq_factor, new.high_freq_factor) == (5e5, 8.0, 1.0, 4.0)
    assert read_rope({}).theta == 10000.0 and read_rope({"rope_theta": 1e6}).rope_type == "default"


def test_write_rope_keeps_the_requested_layout():
    raw = {"rope_parameters": {"rope_theta": 1.0}}
    write_rope(raw, RopeSettings(theta=5e5, legacy_layout=True))
    assert raw == {"rope_theta": 5e5, "rope_scaling": None}
    write_rope(raw, RopeSettings(theta=5e5, rope_type="linear", factor=2.0))
    assert raw == {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}


def test_a_config_json_that_is_not_an_object_is_named(tmp_path):
    from bridge_convert.hf_config import load_hf_config

    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="config.json holds a JSON list, not an object"):
        load_hf_config(tmp_path)


def test_null_bos_and_eos_take_the_ids_of_the_tokenizer_saved_beside_them(tmp_path):
    """transformers' AutoTokenizer reading the same directory is the oracle for the ids."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer

    from bridge_convert.hf_config import fill_token_ids_from_tokenizer

    vocab = {"<unk>": 0, "hello": 1, "<s>": 2, "</s>": 3, "<big>": 9}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))

    def export(config: dict, **named) -> dict:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", **named}))
        (tmp_path / "config.json").write_text(json.dumps(config))
        fill_token_ids_from_tokenizer(tmp_path)
        return json.loads((tmp_path / "config.json").read_text())

    filled = export({"vocab_size": 8, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
                    bos_token="<s>", eos_token={"__type": "AddedToken", "content": "</s>", "special": True})
    oracle = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (filled["bos_token_id"], filled["eos_token_id"]) == (oracle.bos_token_id, oracle.eos_token_id) == (2, 3)
    assert filled["pad_token_id"] is None  # only bos / eos: a null pad may be the source's own choice
    # set ids stay; a token the tokenizer lacks, or one outside the vocabulary, stays null
    assert export({"vocab_size": 8, "bos_token_id": 5, "eos_token_id": None}, bos_token="<s>",
                  eos_token="<none>") == {"vocab_size": 8, "bos_token_id": 5, "eos_token_id": None}
    assert export({"vocab_size": 8, "bos_token_id": None}, bos_token="<big>")["bos_token_id"] is None
    (tmp_path / "tokenizer.json").unlink()  # no tokenizer: nothing to take
    assert export({"vocab_size": 8, "bos_token_id": None}, bos_token="<s>")["bos_token_id"] is None
