"""Triton kernels of :mod:`.swiglu` (imported only where they run: a CUDA GPU with Triton)."""

import triton
import triton.language as tl


@triton.jit
def load_gate_up(y_ptr, width, BLOCK: tl.constexpr):
    """This program's row and column block: offsets, mask, and the gate / up values in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate_ptr = y_ptr + row * 2 * width + cols
    a = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(gate_ptr + width, mask=mask, other=0.0).to(tl.float32)
    return row * width + cols, mask, gate_ptr, a, b


@triton.jit
def forward_kernel(y_ptr, out_ptr, width, BLOCK: tl.constexpr):
    out_offsets, mask, _, a, b = load_gate_up(y_ptr, width, BLOCK)
    silu = (a * tl.sigmoid(a)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + out_offsets, (silu * b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_kernel(y_ptr, grad_ptr, width, BLOCK: tl.constexpr):
    grad_offsets, mask, gate_ptr, a, b = load_gate_up(y_ptr, width, BLOCK)
    g = tl.load(grad_ptr + grad_offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    d_gate = g * sig * (1.0 + a * (1.0 - sig)) * b
    d_up = g * a * sig
    tl.store(gate_ptr, d_gate.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(gate_ptr + width, d_up.to(y_ptr.dtype.element_ty), mask=mask)
