"""Core attention and self-attention for the native spec.

``NativeDotProductAttention`` is a drop-in for megatron-core's ``DotProductAttention`` (same constructor and
forward signature) that never materialises the ``[b, h, s, s]`` score matrix:

* plain causal attention (GPTModel's case, ``attention_mask=None``): ``F.scaled_dot_product_attention`` with
  ``is_causal=True`` and ``enable_gqa=True``, so torch picks flash / cuDNN / memory-efficient kernels on a GPU
  (its flash kernel reads the grouped k/v heads in place) and its fused CPU kernel on a CPU;
* packed documents (``PackedSeqParams(qkv_format="thd")``) and sliding windows (``config.window_size``):
  FlexAttention with a block mask on CUDA, SDPA with a dense boolean mask elsewhere;
* an explicit ``attention_mask`` (bool, True = masked, megatron's convention) is honoured as the local spec
  does, through SDPA's masked kernels.

``NativeSelfAttention`` is megatron-core's ``SelfAttention`` with a short training forward: QKV projection
(megatron's own, with q/k layernorm), RoPE through :mod:`.rope` (one table per call, fused on GPU, per-document
positions for packed rows without a host sync), core attention, output projection. Anything that forward does
not cover (inference / KV cache, cross attention, output gates, recompute or offload of attention pieces,
context parallelism) goes to megatron-core's own forward unchanged.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch import Tensor

from .masks import dense_mask, flex_attention_available, flex_block_mask, packed_layout
from .rope import apply_rope, rope_tables

__all__ = ["NativeDotProductAttention", "NativeSelfAttention"]


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention materialises the scores; compiled, it is a fused Triton kernel.
    return torch.compile(flex_attention, dynamic=False)


def _is_thd(packed_seq_params) -> bool:
    return packed_seq_params is not None and packed_seq_params.qkv_format == "thd"


class NativeDotProductAttention(MegatronModule):
    """``DotProductAttention`` through ``scaled_dot_product_attention`` / FlexAttention; no parameters.

    Args: as megatron-core's ``DotProductAttention``.

    Raises:
        ValueError: for settings SDPA cannot express (context parallelism, softmax offsets / attention sinks).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("the native spec has no context parallelism (context_parallel_size="
                             f"{config.context_parallel_size}); use transformer_impl='transformer_engine'")
        if config.softmax_type != "vanilla":
            raise ValueError(f"the native spec supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        tp = pg_collection.tp.size()
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, tp)
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        # apply_query_key_layer_scaling divides the scale by the layer number and the local spec's softmax
        # multiplies it back: the product is the plain scale, which is what SDPA gets.
        head_dim = divide(projection, config.num_attention_heads)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = (tuple(config.window_size) if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        """Attention over ``[s, b, heads, d]`` inputs (or ``[t, heads, d]`` for ``thd``); returns ``[s, b, h]``.

        Raises:
            ValueError: for an ``attention_bias`` (the local spec rejects it too) or a ``thd`` batch of b > 1.
        """
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the native spec's core attention")
        squeezed = query.dim() == 3
        if squeezed:  # megatron-core's own SelfAttention squeezes the batch of 1 out for thd
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        s, b = query.shape[0], query.shape[1]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and s > 1
        # [s, b, n, d] -> [b, n, s, d] as strided views: SDPA's GPU kernels take any batch/head/seq strides.
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        gqa = self.heads_per_partition != self.groups_per_partition
        dropout = self.dropout_p if self.training else 0.0
        with self._rng_context(dropout):
            if _is_thd(packed_seq_params) or self.window is not None or attention_mask is not None:
                out = self._masked(q, k, v, attention_mask, causal, packed_seq_params, dropout, gqa)
            else:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)
        return out.squeeze(1) if squeezed else out

    def _rng_context(self, dropout: float):
        # The local spec draws attention dropout from the model-parallel RNG stream (different per TP rank).
        if dropout > 0.0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return _NullContext()

    def _masked(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, causal: bool,
                packed_seq_params, dropout: float, gqa: bool) -> Tensor:
        length = q.shape[2]
        doc_ids = None
        if _is_thd(packed_seq_params):
            if q.shape[0] != 1:
                raise ValueError(f"qkv_format='thd' takes one packed row (batch 1), got batch {q.shape[0]}; "
                                 "flatten the rows into one and concatenate their cu_seqlens")
            doc_ids = packed_layout(packed_seq_params, length, q.device).doc_ids
        use_flex = (q.is_cuda and attention_mask is None and dropout == 0.0 and flex_attention_available())
        if use_flex:
            block_mask = flex_block_mask(length, q.device, causal=causal, packed_seq_params=packed_seq_params,
                                         doc_ids=doc_ids, window=self.window)
            return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=self.softmax_scale,
                                              enable_gqa=gqa)
        if attention_mask is not None:
            allowed = ~attention_mask.to(torch.bool)
            if self.window is not None or doc_ids is not None:
                allowed = allowed & dense_mask(length, q.device, causal=False, doc_ids=doc_ids, window=self.window)
        else:
            allowed = dense_mask(length, q.device, causal=causal, doc_ids=doc_ids, window=self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                              scale=self.softmax_scale, enable_gqa=gqa)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """No parameters (vanilla softmax only), so nothing to checkpoint, like ``DotProductAttention``."""
        return {}


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


class NativeSelfAttention(SelfAttention):
    """megatron-core ``SelfAttention`` whose training forward applies RoPE through :func:`.rope.apply_rope`.

    Parameters, submodules and every other method are ``SelfAttention``'s, so checkpoints, TP sharding and
    ``sharded_state_dict`` are unchanged.
    """

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, packed_seq_params=None, sequence_len_offset=None,
                *, inference_params=None):
        if not self._fast_path(key_value_states, inference_context, inference_params, rotary_pos_cos,
                               rotary_pos_sin, rotary_pos_cos_sin):
            return super().forward(
                hidden_states, attention_mask, key_value_states=key_value_states,
                inference_context=inference_context, rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                inference_params=inference_params,
            )
        # [s, b, np, hn], [s, b, ng, hn], [s, b, ng, hn]; q/k layernorm already applied.
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        no_rope = bool(self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1])
        if rotary_pos_emb is not None and not no_rope:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            positions = None
            if _is_thd(packed_seq_params):
                positions = packed_layout(packed_seq_params, query.shape[0], query.device).positions
            mscale = self._yarn_concentration_factor
            interleaved = self.config.rotary_interleaved
            q_cos, q_sin = rope_tables(q_emb, query.dtype, mscale, positions)
            if k_emb is q_emb:
                k_cos, k_sin = q_cos, q_sin
            else:
                k_cos, k_sin = rope_tables(k_emb, key.dtype, mscale, positions)
            query = apply_rope(query, q_cos, q_sin, interleaved)
            key = apply_rope(key, k_cos, k_sin, interleaved)
        # q, k, v come out of get_query_key_value_tensors as views into the fused QKV projection's output. Core
        # attention saves its inputs for the backward, and a saved view keeps that whole [s, b, q + k + v]
        # tensor alive (per layer 2.5x the size of v for Llama-3-style GQA). Own copies release it; RoPE's
        # outputs already are (no copy made).
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        core_attn_out = self.core_attention(query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
                                            attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        return self.linear_proj(core_attn_out)

    def _fast_path(self, key_value_states, inference_context, inference_params, rotary_pos_cos, rotary_pos_sin,
                   rotary_pos_cos_sin) -> bool:
        config = self.config
        if key_value_states is not None or inference_context is not None or inference_params is not None:
            return False
        if rotary_pos_cos is not None or rotary_pos_sin is not None or rotary_pos_cos_sin is not None:
            return False
        if not isinstance(self.core_attention, NativeDotProductAttention):
            return False
        if config.attention_output_gate or config.flash_decode or config.multi_latent_attention:
            return False
        if getattr(config, "fused_single_qkv_rope", False) or getattr(config, "mrope_section", None):
            return False
        if self.checkpoint_core_attention and self.training:
            return False
        if self.offload_qkv_linear or self.offload_core_attention or self.offload_attn_proj:
            return False
        return not getattr(config, "test_mode", False)
