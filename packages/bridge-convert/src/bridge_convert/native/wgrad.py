"""Weight-gradient GEMMs that accumulate straight into megatron's fp32 ``main_grad`` (no apex, no TE).

With ``gradient_accumulation_fusion=True`` megatron-core's linear layers compute each weight gradient as
``main_grad += grad_output^T @ input`` in one GEMM whose output is the fp32 gradient buffer of megatron's
``DistributedDataParallel``. Without it, autograd first materialises a bf16 weight gradient, then DDP's
backward hook adds it into ``main_grad``: a weight-sized bf16 temporary plus a read-modify-write of the fp32
buffer for every weight, every micro-batch (about 12 GB of memory traffic per step at 1.2B parameters), and
the bf16 rounding of the gradient before it is accumulated.

megatron-core takes that GEMM from apex's ``fused_weight_gradient_mlp_cuda`` extension and refuses the setting
when apex is absent. :func:`install_torch_wgrad_accumulation` provides the two functions megatron calls with
torch: ``torch.addmm(..., out_dtype=torch.float32)`` (cuBLAS with bf16 inputs, fp32 accumulate and fp32 C,
beta = 1, i.e. exactly the apex kernel's contract) on CUDA; a plain fp32 ``addmm_`` elsewhere (CPU tests).

Like apex's extension, this is only meaningful when the weights have a ``main_grad`` (models wrapped in
megatron-core's DDP, which bridge-train always does).
"""

from __future__ import annotations

import torch

__all__ = ["accumulate_weight_grad", "install_torch_wgrad_accumulation", "torch_wgrad_accumulation_installed"]


def _flat2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t


_DTYPE_OUT_WORKS: bool | None = None  # whether torch.addmm(out_dtype=float32) runs here; probed on first CUDA use


def accumulate_weight_grad(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad (fp32) += grad_output^T @ input`` without a weight-sized low-precision temporary.

    ``input`` ``[tokens, in]`` and ``grad_output`` ``[tokens, out]`` (any leading dims, one dtype); ``main_grad``
    ``[out, in]``. bf16 / fp16 operands on CUDA: one cuBLAS GEMM with fp32 accumulation and fp32 C (beta = 1);
    elsewhere the product of the operands upcast to fp32.
    """
    global _DTYPE_OUT_WORKS
    x, g = _flat2d(total_input), _flat2d(grad_output)
    if x.dtype == torch.float32:
        main_grad.addmm_(g.t(), x)
        return
    if main_grad.is_cuda and _DTYPE_OUT_WORKS is not False:
        try:
            torch.addmm(main_grad, g.t(), x, out_dtype=torch.float32, out=main_grad)
            _DTYPE_OUT_WORKS = True
            return
        except (TypeError, RuntimeError):  # torch without the out_dtype overloads for these dtypes
            _DTYPE_OUT_WORKS = False
    main_grad.addmm_(g.t().float(), x.float())


class TorchWgradAccumulation:
    """The interface of apex's ``fused_weight_gradient_mlp_cuda`` module, in torch.

    ``wgrad_gemm_accum_fp32(input, grad_output, main_grad)``: :func:`accumulate_weight_grad` into an fp32
    ``main_grad``; ``wgrad_gemm_accum_fp16`` the same for a bf16 / fp16 ``main_grad``.
    """

    wgrad_gemm_accum_fp32 = staticmethod(accumulate_weight_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        x, g = _flat2d(total_input), _flat2d(grad_output)
        main_grad.addmm_(g.t().to(main_grad.dtype), x.to(main_grad.dtype))


def torch_wgrad_accumulation_installed() -> bool:
    from megatron.core.tensor_parallel import layers

    return getattr(layers, "fused_weight_gradient_mlp_cuda", None) is TorchWgradAccumulation


def install_torch_wgrad_accumulation() -> bool:
    """Let megatron-core's linear layers run ``gradient_accumulation_fusion`` without apex.

    Sets megatron-core's module-level handle for apex's extension to :class:`TorchWgradAccumulation` when
    apex's extension is not importable; leaves a real apex in place. Idempotent. Returns True when the torch
    version is (now) the one megatron-core calls.
    """
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "_grad_accum_fusion_available", False) and not torch_wgrad_accumulation_installed():
        return False  # apex's CUDA extension is there: keep it
    layers.fused_weight_gradient_mlp_cuda = TorchWgradAccumulation
    layers._grad_accum_fusion_available = True
    return True
