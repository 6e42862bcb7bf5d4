"""Triton kernel of :mod:`.fused_step`'s fused mixed-precision Adam step (imported only where it runs)."""

import triton
import triton.language as tl


@triton.jit
def adam_step_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, model_ptr, n, grad_scale, lr, beta1, beta2,
                     eps, weight_decay, step_size, bias_correction2_sqrt, DECOUPLED: tl.constexpr,
                     COPY: tl.constexpr, BLOCK: tl.constexpr):
    """One Adam(W) step on fp32 ``param`` / moments from ``grad * grad_scale``; with COPY also ``model = param``."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0)
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * grad_scale
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    p = p - step_size * (m / denom)
    tl.store(param_ptr + offsets, p, mask=mask)
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    if COPY:
        tl.store(model_ptr + offsets, p.to(model_ptr.dtype.element_ty), mask=mask)
