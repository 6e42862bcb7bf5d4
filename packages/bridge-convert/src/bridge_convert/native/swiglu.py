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
product rounded once) and megatron's ``swiglu_back`` formula in fp32. CUDA tensors only (Triton); everything
else uses megatron-core's own path, see :class:`NativeMLP`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["swiglu", "swiglu_kernels_available"]

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


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        y = y.contiguous()
        width = y.shape[-1] // 2
        out = torch.empty((*y.shape[:-1], width), dtype=y.dtype, device=y.device)
        rows = y.numel() // (2 * width)
        if rows:
            _kernels()[0][_grid(rows, width)](y, out, width, BLOCK=_BLOCK)
        ctx.save_for_backward(y)
        ctx.consumed = False
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if ctx.consumed:
            raise RuntimeError("the native SwiGLU kernel's backward reuses its saved input for the gradient and "
                               "cannot run twice on one graph (retain_graph=True); set "
                               "bias_activation_fusion=False for that")
        ctx.consumed = True
        (y,) = ctx.saved_tensors
        grad = grad.contiguous()
        width = y.shape[-1] // 2
        rows = y.numel() // (2 * width)
        if rows:
            _kernels()[1][_grid(rows, width)](y, grad, width, BLOCK=_BLOCK)
        return y


def swiglu(y: Tensor) -> Tensor:
    """``silu(y[..., :F]) * y[..., F:]`` for a CUDA tensor ``y`` of last dimension ``2F`` (Triton kernels)."""
    if y.shape[-1] % 2:
        raise ValueError(f"SwiGLU needs an even last dimension (gate | up), got {tuple(y.shape)}")
    return _SwiGLU.apply(y)
