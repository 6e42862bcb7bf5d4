"""Tiny models for tests: a megatron-core GPTModel and random-initialised HF checkpoints on disk.

The tiny shape everywhere: 2 layers, hidden 64, 4 heads, 2 KV groups (GQA), FFN 128, vocab 128,
RMSNorm, SwiGLU, RoPE. Nothing is downloaded; HF models are built from literal config dicts.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "TINY_HF_CONFIGS",
    "build_tiny_gpt",
    "full_state_dict",
    "save_tiny_hf_checkpoint",
    "shard_state_dict",
    "tiny_hf_config",
    "tiny_transformer_config",
]

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=128, seq_length=32)

_LLAMA_BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

#: Literal HF config dicts, one per supported family (the hub's layout, shrunk).
TINY_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_BASE,
    # Llama 3.1: llama3 rope scaling in the legacy hub layout (`rope_scaling` + `rope_theta`).
    "llama31": {**_LLAMA_BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    # Llama 3.2: tied embeddings plus llama3 rope scaling.
    "llama32": {**_LLAMA_BASE, "tie_word_embeddings": True,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "attention_bias": False, "tie_word_embeddings": False,
        "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "float32",
    },
}


#: The tiny checkpoints the conversion tests run for every supported family.
FAMILIES = ("llama", "llama31", "llama32", "qwen2", "qwen3", "mistral")


def tiny_hf_config(family: str = "llama", **overrides: Any):
    """A transformers ``PretrainedConfig`` for the tiny model of ``family`` (see :data:`TINY_HF_CONFIGS`)."""
    from transformers import AutoConfig

    if family not in TINY_HF_CONFIGS:
        raise KeyError(f"unknown tiny family {family!r}; known: {sorted(TINY_HF_CONFIGS)}")
    raw = copy.deepcopy(TINY_HF_CONFIGS[family])
    raw.update(overrides)
    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


def save_tiny_hf_checkpoint(
    path: str | os.PathLike,
    family: str = "llama",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str = "150KB",
    **overrides: Any,
) -> str:
    """Save a random-initialised tiny HF causal LM with ``save_pretrained`` (safetensors, several shards).

    Norm weights are randomised too (HF initialises them to ones, which would hide a swapped norm).

    Returns:
        The checkpoint directory.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    model = model.to(dtype)
    model.config.dtype = dtype
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    return str(path)


def tiny_transformer_config(**overrides: Any):
    """megatron-core ``TransformerConfig`` of the tiny Llama-like model, fp32, CPU-initialised, no dropout."""
    from megatron.core.transformer import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=TINY["num_layers"], hidden_size=TINY["hidden_size"],
        num_attention_heads=TINY["num_attention_heads"], num_query_groups=TINY["num_query_groups"],
        ffn_hidden_size=TINY["ffn_hidden_size"], normalization="RMSNorm", layernorm_epsilon=1e-5,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, bias_activation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, pipeline_dtype=torch.float32,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_tiny_gpt(config=None, *, pre_process: bool | None = None, post_process: bool | None = None,
                   vocab_size: int = TINY["vocab_size"], seed: int = 0):
    """Build the tiny GPTModel (local spec) for the current parallel state; the runtime must be initialised."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = config or tiny_transformer_config()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    torch.manual_seed(seed)
    return GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=vocab_size,
        max_sequence_length=TINY["seq_length"], position_embedding_type="rope", pre_process=pre_process,
        post_process=post_process, share_embeddings_and_output_weights=False,
    )


def _global_layer_names(model) -> dict[str, str]:
    """Map this stage's state-dict prefixes ``decoder.layers.{local}.`` to global layer numbering."""
    mapping = {}
    decoder = getattr(model, "decoder", None)
    for local, layer in enumerate(getattr(decoder, "layers", [])):
        mapping[f"decoder.layers.{local}."] = f"decoder.layers.{layer.layer_number - 1}."
    return mapping


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The parameters of a world-size-1 model, cloned, keyed by megatron-core names."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def shard_state_dict(full: dict[str, torch.Tensor], model, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """Cut a world-size-1 state dict down to what ``model`` (this rank's TP/PP slice) holds.

    Uses megatron-core's own parameter attributes (``partition_dim``, ``partition_stride``), the same rule
    its CPU initialisation splits master weights by, so it is independent of bridge-convert's mappings.
    """
    renames = _global_layer_names(model)
    out = {}
    for name, param in model.named_parameters():
        global_name = name
        for local, glob in renames.items():
            if name.startswith(local):
                global_name = glob + name[len(local):]
                break
        tensor = full[global_name]
        if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
            dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
            chunks = torch.chunk(tensor, tp_size * stride, dim=dim)
            tensor = torch.cat(chunks[tp_rank::tp_size], dim=dim)
        if tensor.shape != param.shape:
            raise ValueError(f"{name}: sharded shape {tuple(tensor.shape)} != parameter {tuple(param.shape)}")
        out[name] = tensor
    return out
