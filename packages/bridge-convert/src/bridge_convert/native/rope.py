"""Rotary position embedding for the native spec: the same formula as megatron-core, fewer kernels.

megatron-core applies RoPE (``rope_utils._apply_rotary_pos_emb_bshd``) to q and k separately, recomputing
``cos``/``sin`` of the frequency table for each and building ``rotate_half`` with a ``cat``; its fused path
(``apply_rope_fusion``) needs Transformer Engine, and its packed-sequence path loops over the documents in
Python with a host sync per call. Here:

* ``cos``/``sin`` are computed once per layer call for q and k together,
* on CUDA the elementwise chain goes through ``torch.compile`` (one kernel for q, one for k, forward and
  backward), on CPU it runs eagerly with megatron's exact arithmetic (the parity tests compare bit for bit),
* packed sequences gather the table by each token's position inside its document: no loop, no host sync.

Shapes: ``t`` is ``[s, b, h, d]``; ``freqs`` is megatron's table ``[s_max, 1, 1, rot]`` (fp32, already
``cat(f, f)`` or interleaved as ``config.rotary_interleaved`` says).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["apply_rope", "rope_tables"]


def _rotate_half(x: Tensor, interleaved: bool) -> Tensor:
    if not interleaved:
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rope_eager(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    rot = cos.shape[-1]
    if rot == t.shape[-1]:
        return t * cos + _rotate_half(t, interleaved) * sin
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    return torch.cat((t_rot * cos + _rotate_half(t_rot, interleaved) * sin, t_pass), dim=-1)


@functools.cache
def _rope_compiled():
    # dynamic=None: the first shape compiles static, a second one recompiles once with dynamic sizes. Not
    # fullgraph: past dynamo's recompile limit (many dtypes / head counts in one process, as in the test suite)
    # it must fall back to eager instead of raising.
    return torch.compile(_rope_eager)


def rope_tables(freqs: Tensor, dtype: torch.dtype, mscale: float = 1.0,
                positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``cos``/``sin`` of megatron's frequency table, cast to the activation dtype like megatron does.

    Args:
        freqs: ``[s_max, 1, 1, rot]`` fp32 table from ``RotaryEmbedding``.
        dtype: the dtype of q/k.
        mscale: YaRN attention scaling folded into the tables (1.0 otherwise).
        positions: per-token positions ``[t]`` for packed sequences; None takes rows ``0..s-1`` (the caller
            slices to the sequence length).

    Returns:
        ``(cos, sin)`` of shape ``[s or t, 1, 1, rot]`` in ``dtype``.
    """
    if positions is not None:
        freqs = freqs.index_select(0, positions)
    return (torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype)


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate ``t`` ``[s, b, h, d]`` by the tables ``[s, 1, 1, rot]`` (``rot <= d``; the rest passes through)."""
    cos, sin = cos[: t.shape[0]], sin[: t.shape[0]]
    if t.is_cuda and not torch.compiler.is_compiling():
        return _rope_compiled()(t, cos, sin, interleaved)
    return _rope_eager(t, cos, sin, interleaved)
