"""Attention masks for packed documents and sliding windows, as dense boolean masks or FlexAttention block masks.

A packed micro-batch (megatron-core's ``qkv_format="thd"``) is one row of ``T`` tokens holding several documents
back to back; ``cu_seqlens`` (int32, ``[n_docs + 1]``, starting at 0) marks where each starts. A token may attend
to earlier tokens of its own document only, and its RoPE position restarts at 0 with each document. Tokens past
``cu_seqlens[-1]`` (tail padding) form one more document of their own.

What is built per micro-batch (document ids, in-document positions, a block mask) is cached on the
``PackedSeqParams`` object itself, so the layers of one forward share it and it dies with the batch.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "PackedLayout",
    "dense_mask",
    "flex_attention_available",
    "flex_block_mask",
    "packed_layout",
]

_CACHE_ATTR = "_bridge_native_cache"


class PackedLayout:
    """Per-token document ids and in-document positions of one packed row.

    Attributes:
        doc_ids: ``[T]`` int32, the document index of every token.
        positions: ``[T]`` int64, the token's position inside its document (the RoPE position).
        cu_seqlens: the boundaries it was built from (int32, on the tokens' device).
    """

    __slots__ = ("cu_seqlens", "doc_ids", "positions")

    def __init__(self, cu_seqlens: Tensor, total: int) -> None:
        tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
        bounds = cu_seqlens.to(torch.int64)
        # Every boundary starts a document (the last one starts the tail padding, if any): searchsorted with
        # right=True gives 1 + the index of the document a token belongs to.
        doc = torch.searchsorted(bounds.contiguous(), tokens, right=True) - 1
        self.doc_ids = doc.to(torch.int32)
        self.positions = tokens - bounds.index_select(0, doc)
        self.cu_seqlens = cu_seqlens


def _cache(packed_seq_params) -> dict:
    cache = getattr(packed_seq_params, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(packed_seq_params, _CACHE_ATTR, cache)
    return cache


def packed_layout(packed_seq_params, total: int, device: torch.device) -> PackedLayout:
    """The :class:`PackedLayout` of a ``thd`` micro-batch of ``total`` tokens (cached on the params object).

    Uses ``cu_seqlens_q_padded`` when given (megatron's convention for RoPE and for TE's layout), else
    ``cu_seqlens_q``; query and key boundaries must agree (self-attention).

    Raises:
        ValueError: if the boundaries are missing, or q and kv boundaries differ.
    """
    key = ("layout", total, str(device))
    cache = _cache(packed_seq_params)
    if key not in cache:
        cu_q = packed_seq_params.cu_seqlens_q_padded
        if cu_q is None:
            cu_q = packed_seq_params.cu_seqlens_q
        cu_kv = packed_seq_params.cu_seqlens_kv_padded
        if cu_kv is None:
            cu_kv = packed_seq_params.cu_seqlens_kv
        if cu_q is None:
            raise ValueError("PackedSeqParams(qkv_format='thd') needs cu_seqlens_q (int32 document boundaries)")
        if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_kv.to(cu_q.device), cu_q):
            raise ValueError("the native spec's packed attention is self-attention: cu_seqlens_kv must equal "
                             "cu_seqlens_q")
        cache[key] = PackedLayout(cu_q.to(device), total)
    return cache[key]


def dense_mask(length: int, device: torch.device, *, causal: bool = True, doc_ids: Tensor | None = None,
               window: tuple[int, int] | None = None) -> Tensor:
    """``[length, length]`` bool mask, True where attention is allowed (``scaled_dot_product_attention``'s sense).

    Args:
        causal: key position <= query position.
        doc_ids: per-token document ids; attention only within a document.
        window: megatron's ``window_size = (left, right)``: keys in ``[q - left, q + right]`` (-1: unbounded).
    """
    q = torch.arange(length, device=device).unsqueeze(1)
    k = torch.arange(length, device=device).unsqueeze(0)
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        allowed &= k <= q
    if window is not None:
        left, right = window
        if left >= 0:
            allowed &= k >= q - left
        if right >= 0:
            allowed &= k <= q + right
    if doc_ids is not None:
        allowed &= doc_ids.unsqueeze(1) == doc_ids.unsqueeze(0)
    return allowed


@functools.cache
def flex_attention_available() -> bool:
    """True when FlexAttention imports (torch >= 2.5); the native spec uses it for masked attention on CUDA."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


def _mask_mod(causal: bool, doc_ids: Tensor | None, window: tuple[int, int] | None):
    left, right = window if window is not None else (-1, -1)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = q_idx >= 0  # an all-true start that keeps the index tensors' shape and device
        if causal:
            allowed = allowed & (kv_idx <= q_idx)
        if left >= 0:
            allowed = allowed & (kv_idx >= q_idx - left)
        if right >= 0:
            allowed = allowed & (kv_idx <= q_idx + right)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[q_idx] == doc_ids[kv_idx])
        return allowed

    return mask_mod


_WINDOW_BLOCK_MASKS: dict = {}


def flex_block_mask(length: int, device: torch.device, *, causal: bool = True, packed_seq_params=None,
                    doc_ids: Tensor | None = None, window: tuple[int, int] | None = None):
    """A FlexAttention ``BlockMask`` with the same meaning as :func:`dense_mask`, built without a ``T x T`` tensor.

    A packed batch's mask is cached on its ``packed_seq_params``; a mask that depends only on the length and
    the window (no documents) is cached per process.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if doc_ids is not None:
        cache, key = _cache(packed_seq_params), ("block_mask", length, causal, window, str(device))
    else:
        cache, key = _WINDOW_BLOCK_MASKS, (length, causal, window, str(device))
    if key not in cache:
        cache[key] = create_block_mask(_mask_mod(causal, doc_ids, window), B=None, H=None, Q_LEN=length,
                                       KV_LEN=length, device=device, _compile=True)
    return cache[key]
