"""SwiGLU over megatron's fused ``linear_fc1`` output, as one Triton kernel forward and one backward.

megatron-core's fc1 of a gated MLP produces ``y = [gate | up]`` along the last dimension (``2F`` wide per TP
rank); the activation is ``silu(gate) * up`` (``F`` wide). Its ``bias_activation_fusion`` path runs that through
``jit_fuser``-compiled functions whose backward builds the two halves of the gradient separately and
concatenates them. Here each direction is a single pass over memory:

* forward reads ``y`` once and writes ``silu(gate) * up``;
* backward reads ``y`` and the incoming gradient once and writes ``d gate | d up`` **into ``y``'s own storage**
  (``y`` is saved only by this function and is dead after its backward), so the backward allocates nothing.
  A second backward through the same graph (``retain_graph=True``) would see the overwritten ``y``; it raises.

Arithmetic is torch eager's for ``F.silu(gate) * up`` in the input dtype (silu in fp32 rounded to the dtype, the
product rounded once) and megatron's ``swiglu_back`` formula in fp32. The kernels need CUDA tensors (Triton);
the same functions run torch eager arithmetic elsewhere.

:func:`swiglu_into_consumer` adds the memory option (``recompute_activation_output``): the SwiGLU output, which
``linear_fc2`` saves for its weight gradient, is released right after fc2's forward and refilled (one more SwiGLU
forward, written into the released tensor's own storage) by a hook that runs just before fc2's backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .release import release_until_backward

__all__ = ["swiglu", "swiglu_into_consumer", "swiglu_kernels_available"]

_BLOCK = 1024


@functools.cache
def _kernels():
    from . import _swiglu_triton  # imports triton: only where a kernel is about to run

    return _swiglu_triton.forward_kernel, _swiglu_triton.backward_kernel


@functools.cache
def swiglu_kernels_available() -> bool:
    """True when a CUDA GPU and an importable Triton can run the kernels."""
    if not torch.cuda.is_available():
        return False
    try:
        _kernels()
    except Exception:
        return False
    return True


def _grid(rows: int, width: int) -> tuple[int, int]:
    return rows, (width + _BLOCK - 1) // _BLOCK


def _forward_into(y: Tensor, out: Tensor, triton: bool) -> None:
    """``out = silu(gate) * up`` for ``y = [gate | up]`` (contiguous), written into ``out``'s memory."""
    width = y.shape[-1] // 2
    rows = y.numel() // (2 * width)
    if triton:
        if rows:
            _kernels()[0][_grid(rows, width)](y, out, width, BLOCK=_BLOCK)
        return
    gate, up = y.chunk(2, dim=-1)
    torch.mul(F.silu(gate), up, out=out)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, triton: bool) -> Tensor:
        y = y.contiguous()
        out = torch.empty((*y.shape[:-1], y.shape[-1] // 2), dtype=y.dtype, device=y.device)
        _forward_into(y, out, triton)
        ctx.save_for_backward(y)
        ctx.triton, ctx.consumed = triton, False
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        if not ctx.triton:  # megatron's swiglu_back formula, in fp32
            gate, up = y.float().chunk(2, dim=-1)
            g, sig = grad.float(), torch.sigmoid(gate)
            return torch.cat((g * sig * (1 + gate * (1 - sig)) * up, g * gate * sig), dim=-1).to(y.dtype), None
        if ctx.consumed:
            raise RuntimeError("the native SwiGLU kernel's backward reuses its saved input for the gradient and "
                               "cannot run twice on one graph (retain_graph=True); set "
                               "bias_activation_fusion=False for that")
        ctx.consumed = True
        grad = grad.contiguous()
        width = y.shape[-1] // 2
        rows = y.numel() // (2 * width)
        if rows:
            _kernels()[1][_grid(rows, width)](y, grad, width, BLOCK=_BLOCK)
        return y, None


def swiglu(y: Tensor, triton: bool | None = None) -> Tensor:
    """``silu(y[..., :F]) * y[..., F:]`` for ``y`` of last dimension ``2F``.

    ``triton`` (default: whether ``y`` is on CUDA with Triton) picks the Triton kernels, whose backward overwrites
    ``y`` with its gradient (pass a tensor nothing else reads after this call); otherwise torch eager arithmetic.
    """
    if y.shape[-1] % 2:
        raise ValueError(f"SwiGLU needs an even last dimension (gate | up), got {tuple(y.shape)}")
    if triton is None:
        triton = y.is_cuda and swiglu_kernels_available()
    return _SwiGLU.apply(y, triton)


def swiglu_into_consumer(y: Tensor, consumer: Callable[[Tensor], Any], *, triton: bool,
                         recompute_output: bool) -> Any:
    """``consumer(swiglu(y))``; with ``recompute_output`` the SwiGLU output is not kept for the backward.

    The consumer (megatron's ``linear_fc2``) saves its input, the SwiGLU output (``F`` wide, a third of the MLP's
    saved activations), for its weight gradient. With ``recompute_output`` that memory is released as soon as the
    consumer has run, and a hook on the consumer's output refills it, one SwiGLU forward from ``y`` (which the
    SwiGLU backward saves anyway), just before the consumer's backward reads it. The consumer must return its
    output tensor (or a tuple starting with it) and use its input only through what autograd saves.
    """
    act = swiglu(y, triton)
    result = consumer(act)
    out = result[0] if isinstance(result, tuple) else result
    if not (recompute_output and torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad):
        return result
    # y.contiguous(): the same tensor the SwiGLU saved
    release_until_backward(act, out, lambda buffer, source: _forward_into(source, buffer, triton), y.contiguous())
    return result
