"""What Llama-style dense decoders share: the mapping table and the HF <-> provider config translation.

Llama 3 / 3.1 / 3.2, Qwen2, Qwen3 and Mistral differ only in a few switches (QKV bias, q/k RMSNorm, sliding
window, which config keys exist); the family modules call these with their switches.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..hf_config import RopeSettings, dtype_from_hf, dtype_to_hf, read_rope, write_rope
from ..mappings import QKV, Direct, GatedMLP, Mapping, VocabParallel

if TYPE_CHECKING:
    from ..provider import GPTModelProvider

L = "decoder.layers.*."
H = "model.layers.*."


def dense_decoder_mappings(*, qkv_bias: bool = False, qk_norm: bool = False) -> tuple[Mapping, ...]:
    """The mapping table; norms appear under both the local/native and the TE-fused megatron names."""
    table: list[Mapping] = [
        VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        VocabParallel("output_layer.weight", "lm_head.weight"),
        Direct("decoder.final_layernorm.weight", "model.norm.weight"),
        Direct(L + "input_layernorm.weight", H + "input_layernorm.weight"),
        Direct(L + "self_attention.linear_qkv.layer_norm_weight", H + "input_layernorm.weight"),
        Direct(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        Direct(L + "mlp.linear_fc1.layer_norm_weight", H + "post_attention_layernorm.weight"),
        QKV(L + "self_attention.linear_qkv.weight",
            q=H + "self_attn.q_proj.weight", k=H + "self_attn.k_proj.weight", v=H + "self_attn.v_proj.weight"),
        Direct(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
        GatedMLP(L + "mlp.linear_fc1.weight", gate=H + "mlp.gate_proj.weight", up=H + "mlp.up_proj.weight"),
        Direct(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
    ]
    if qkv_bias:
        table.append(QKV(L + "self_attention.linear_qkv.bias",
                         q=H + "self_attn.q_proj.bias", k=H + "self_attn.k_proj.bias", v=H + "self_attn.v_proj.bias"))
    if qk_norm:
        table += [
            Direct(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight", "replicated"),
            Direct(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight", "replicated"),
        ]
    return tuple(table)


IGNORE_HF = ("model.layers.*.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq")


def _require(raw: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ValueError(f"HF config is missing {missing} (architecture {raw.get('architectures')})")


def _count(raw: dict[str, Any], key: str, default: Any = None) -> int:
    """``raw[key]`` as a positive integer (``default`` when absent or null)."""
    value = raw.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json: {key} is {value!r}; it must be a positive integer")
    return value


def dense_config_to_provider(raw: dict[str, Any], *, qkv_bias: bool = False, qk_norm: bool = False,
                             default_rope_theta: float = 10000.0, max_position_embeddings: int = 2048,
                             num_key_value_heads: int | None = None, head_dim: int | None = None
                             ) -> dict[str, Any]:
    """HF config dict -> GPTModelProvider keyword arguments (pure; no files, no torch state).

    The keyword defaults are the family's transformers config defaults for keys a config.json may leave out
    (what transformers builds from it): ``num_key_value_heads`` / ``head_dim`` None mean the number of heads /
    ``hidden_size // heads``; a key that is present but null means that too.

    Raises:
        ValueError: for missing required keys and sizes that are not positive integers or do not fit together
            (``num_attention_heads`` not a multiple of ``num_key_value_heads``); each is named.
    """
    _require(raw, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (these decoders use SwiGLU with 'silu')")
    heads = _count(raw, "num_attention_heads")
    hidden = _count(raw, "hidden_size")
    groups = _count(raw, "num_key_value_heads", heads) if "num_key_value_heads" in raw else \
        (num_key_value_heads or heads)
    if heads % groups:
        raise ValueError(f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                         f"({groups})")
    if "head_dim" in raw:
        head_dim = raw["head_dim"]
    if head_dim is None and hidden % heads:
        raise ValueError(f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}); "
                         "give head_dim")
    head_dim = _count({"head_dim": head_dim}, "head_dim", hidden // heads)
    max_positions = _count(raw, "max_position_embeddings", max_position_embeddings)
    rope = read_rope(raw, default_rope_theta)
    kwargs: dict[str, Any] = dict(
        num_layers=_count(raw, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_count(raw, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        vocab_size=_count(raw, "vocab_size"),
        seq_length=max_positions,
        layernorm_epsilon=raw.get("rms_norm_eps", 1e-6),
        normalization="RMSNorm",
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias,
        qk_layernorm=qk_norm,
        share_embeddings_and_output_weights=bool(raw.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope.theta,
        attention_dropout=float(raw.get("attention_dropout", 0.0)),
        hidden_dropout=0.0,
        init_method_std=float(raw.get("initializer_range", 0.02)),
        params_dtype=dtype_from_hf(raw),
    )
    if rope.rope_type == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=rope.factor,
                      rope_scaling_low_freq_factor=rope.low_freq_factor,
                      rope_scaling_high_freq_factor=rope.high_freq_factor,
                      rope_scaling_original_max_position_embeddings=rope.original_max_position_embeddings)
    elif rope.rope_type == "linear":
        kwargs.update(seq_len_interpolation_factor=rope.factor)
    return kwargs


def provider_rope(provider: GPTModelProvider, legacy_layout: bool) -> RopeSettings:
    if provider.rope_scaling:
        return RopeSettings(theta=provider.rotary_base, rope_type="llama3", factor=provider.rope_scaling_factor,
                            low_freq_factor=provider.rope_scaling_low_freq_factor,
                            high_freq_factor=provider.rope_scaling_high_freq_factor,
                            original_max_position_embeddings=provider.rope_scaling_original_max_position_embeddings,
                            legacy_layout=legacy_layout)
    if provider.seq_len_interpolation_factor:
        return RopeSettings(theta=provider.rotary_base, rope_type="linear",
                            factor=provider.seq_len_interpolation_factor, legacy_layout=legacy_layout)
    return RopeSettings(theta=provider.rotary_base, legacy_layout=legacy_layout)


def dense_provider_to_config(provider: GPTModelProvider, source: dict[str, Any] | None, *, architecture: str,
                             model_type: str, qkv_bias: bool = False, qk_norm: bool = False,
                             head_dim_key: bool = True) -> dict[str, Any]:
    """GPTModelProvider -> HF config dict, keeping the source config's other keys and its layout.

    Raises:
        ValueError: for provider settings the HF family cannot express (they are named).
    """
    problems = []
    if bool(provider.add_qkv_bias) != qkv_bias and not provider.add_bias_linear:
        problems.append(f"add_qkv_bias={provider.add_qkv_bias} (the {architecture} family has "
                        f"{'a' if qkv_bias else 'no'} QKV bias)")
    if bool(provider.qk_layernorm) != qk_norm:
        problems.append(f"qk_layernorm={provider.qk_layernorm}")
    if provider.add_bias_linear:
        problems.append("add_bias_linear=True")
    if not provider.gated_linear_unit or provider.normalization != "RMSNorm":
        problems.append("a non-SwiGLU MLP or non-RMSNorm normalization")
    if provider.activation_func is not torch.nn.functional.silu:
        problems.append(f"activation_func={getattr(provider.activation_func, '__name__', provider.activation_func)}")
    head_dim = provider.kv_channels or provider.hidden_size // provider.num_attention_heads
    if problems:
        raise ValueError(f"cannot express this model as {architecture}: " + "; ".join(problems))

    raw: dict[str, Any] = dict(source) if source else {"architectures": [architecture], "model_type": model_type}
    legacy = source is None or "rope_parameters" not in source
    raw.update(
        architectures=[architecture],
        model_type=model_type,
        hidden_size=provider.hidden_size,
        intermediate_size=provider.ffn_hidden_size,
        num_hidden_layers=provider.num_layers,
        num_attention_heads=provider.num_attention_heads,
        num_key_value_heads=provider.num_query_groups or provider.num_attention_heads,
        vocab_size=provider.vocab_size,
        # the longest context the model is made for, not the sequence length of a run (a fine-tune at seq 4096 of a
        # 128k model is still a 128k model: vLLM serves up to this value)
        max_position_embeddings=max(provider.seq_length, int(raw.get("max_position_embeddings") or 0)),
        rms_norm_eps=provider.layernorm_epsilon,
        hidden_act="silu",
        tie_word_embeddings=bool(provider.share_embeddings_and_output_weights),
        attention_dropout=float(provider.attention_dropout),
        initializer_range=float(provider.init_method_std),
    )
    # transformers reads head_dim from any of these configs (default hidden_size / heads): written when the family
    # always has the key, the source had it, or the default would be wrong
    if head_dim_key or "head_dim" in raw or head_dim * provider.num_attention_heads != provider.hidden_size:
        raw["head_dim"] = head_dim
    _drop_token_ids_outside_vocab(raw, provider.vocab_size, (source or {}).get("vocab_size"))
    dtype_key = "torch_dtype" if source is not None and "torch_dtype" in source and "dtype" not in source else "dtype"
    raw[dtype_key] = dtype_to_hf(provider.params_dtype)
    write_rope(raw, provider_rope(provider, legacy))
    return raw


def _drop_token_ids_outside_vocab(raw: dict[str, Any], vocab: int, source_vocab: Any) -> None:
    """Write as null the ``*_token_id`` values (``eos_token_id`` may be a list) that a changed ``vocab_size`` leaves
    outside the vocabulary (a recipe's Llama config shrunk to 256 tokens keeps bos 128000): transformers warns about
    such a config on every load, and no token of this model can have that id. Ids that were already outside the
    source's own vocabulary (``pad_token_id: -1`` on the Hub) are kept as the source wrote them."""
    def outside(token_id: Any) -> bool:
        if type(token_id) is not int:  # null, or a value the source wrote otherwise
            return False
        return token_id >= vocab and (not isinstance(source_vocab, int) or 0 <= token_id < source_vocab)

    dropped = []
    for key, value in list(raw.items()):
        if not key.endswith("_token_id"):
            continue
        if isinstance(value, list) and any(outside(v) for v in value):
            kept = [v for v in value if not outside(v)]
            raw[key] = kept if len(kept) > 1 else kept[0] if kept else None
        elif outside(value):
            raw[key] = None
        else:
            continue
        dropped.append(f"{key} {value}")
    if dropped:
        warnings.warn(f"HF config of this model: {', '.join(dropped)} (from the source config) are outside its "
                      f"vocabulary of {vocab} tokens (the source's has {source_vocab}): written as null (an export "
                      "with a tokenizer takes its bos / eos ids)", stacklevel=3)
