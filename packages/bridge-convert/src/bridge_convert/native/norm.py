"""RMSNorm / LayerNorm for the native spec: one fused kernel per call instead of the unfused reference chain.

The module keeps ``torch.nn.RMSNorm``'s parameter (``weight``, shape ``[hidden]``) and numerics, so a state
dict of the local spec (whose ``WrappedTorchNorm`` *is* ``torch.nn.RMSNorm``) loads unchanged. What changes is
the kernel: for bf16 / fp16 on a GPU with liger-kernel importable, liger's Triton RMSNorm (fp32 statistics, one
read and one write per pass; liger 0.8.5's backward kernel does not compile for fp32 inputs, seen on an H200 with
torch 2.11's Triton); otherwise ``torch.rms_norm``, which torch dispatches to its fused CUDA kernel on GPUs and
to its reference implementation on CPU. Unlike ``WrappedTorchNorm`` it supports sequence parallelism: the weight
is marked ``sequence_parallel`` so megatron-core all-reduces its gradient across the TP group.

:func:`recompute_output_for` is megatron's ``recompute_modules=["layernorm"]`` for this norm without Transformer
Engine: the norm output, which the next linear layer saves for its weight gradient, is released once that layer
has run and recomputed from the norm's input (which the norm saves anyway) just before that layer's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .release import release_until_backward

_LIGER_DTYPES = (torch.bfloat16, torch.float16)

__all__ = ["NativeNorm", "liger_rms_norm_function", "recompute_output_for"]


def liger_rms_norm_function():
    """liger-kernel's RMSNorm autograd function, or None when liger (or its Triton) is not importable."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception:
        return None
    return LigerRMSNormFunction


class NativeNorm(torch.nn.Module):
    """RMSNorm or LayerNorm over the last dimension, with megatron-core's norm-builder signature.

    Args:
        config: the TransformerConfig; ``config.normalization`` picks ``RMSNorm`` or ``LayerNorm``.
        hidden_size: size of the normalised (last) dimension.
        eps: epsilon added to the variance.
        use_liger: use liger-kernel's RMSNorm on CUDA tensors when it imports (False: always ``torch.rms_norm``).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str | None = None,
                 use_liger: bool = True) -> None:
        super().__init__()
        if getattr(config, "layernorm_zero_centered_gamma", False) or zero_centered_gamma:
            raise ValueError("the native spec's norm does not implement layernorm_zero_centered_gamma; "
                             "set it to False or use transformer_impl='transformer_engine'")
        kind = normalization or config.normalization
        if kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization must be 'RMSNorm' or 'LayerNorm' for the native spec, got {kind!r}")
        self.rms = kind == "RMSNorm"
        self.eps = eps
        self.normalized_shape = (hidden_size,)
        # fp32 like torch.nn.RMSNorm in the local spec (Float16Module casts for bf16 runs); on the GPU unless the
        # config initialises on CPU, like megatron-core's linear layers.
        on_gpu = torch.cuda.is_available() and not getattr(config, "use_cpu_initialization", False)
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, device=device))
        sequence_parallel = bool(getattr(config, "sequence_parallel", False))
        for param in (self.weight, self.bias):
            if param is not None:
                param.sequence_parallel = sequence_parallel
        self._liger = liger_rms_norm_function() if self.rms and use_liger else None
        self._release_output = False  # set by recompute_output_for (a flag, not the module: no submodule)
        self._pending: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = self._normalize(x)
        if self._release_output and torch.is_grad_enabled() and out.requires_grad:
            self._pending = (x, out)
        return out

    def _normalize(self, x: Tensor) -> Tensor:
        if not self.rms:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if self._liger is not None and x.is_cuda and x.dtype == self.weight.dtype and x.dtype in _LIGER_DTYPES:
            # "gemma" casting: statistics, scaling and the weight product all in fp32, one cast at the end,
            # which is what torch.rms_norm computes; in_place=False keeps autograd's grad buffers untouched.
            shape = x.shape
            out = self._liger.apply(x.reshape(-1, shape[-1]), self.weight, self.eps, 0.0, "gemma", False)
            return out.view(shape)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        kind = "RMSNorm" if self.rms else "LayerNorm"
        return f"{kind}({self.normalized_shape[0]}, eps={self.eps}, liger={self._liger is not None})"


def recompute_output_for(norm: NativeNorm, consumer: torch.nn.Module) -> None:
    """Keep ``norm``'s output only while ``consumer`` (the module that reads it next) runs its forward.

    After ``consumer``'s forward on exactly that output, the output's storage is released; a hook on the
    consumer's output (its first element if a tuple) writes the recomputed norm output back into that storage
    just before the consumer's backward reads it. The consumer must use its input only through what autograd
    saves (megatron's linear layers do), and nothing else may read the norm output after the consumer's forward
    (in megatron's TransformerLayer the residual is the norm's input, not its output). Outputs that reach the
    consumer as a different tensor (e.g. a sequence-parallel all-gather) are left alone. One extra norm forward
    per call, computed by the same kernel on the same input, so the values are identical.
    """
    if norm._release_output:
        raise ValueError("recompute_output_for: this norm already releases its output for another module")
    norm._release_output = True

    def release(module, args, output) -> None:
        pending, norm._pending = norm._pending, None
        if pending is None or not args or args[0] is not pending[1]:
            return
        x, out = pending
        result = output[0] if isinstance(output, tuple) else output
        if not (isinstance(result, Tensor) and result.requires_grad):
            return
        release_until_backward(out, result, lambda buffer, source: buffer.copy_(norm._normalize(source)), x)

    consumer.register_forward_hook(release)
