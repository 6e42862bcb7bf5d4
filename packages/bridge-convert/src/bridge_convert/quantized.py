"""Loading weights into Transformer Engine's quantized (FP8) parameters.

With ``fp8_param`` (the FP8 recipes' ``fp8_param_gather``), TE builds each linear weight as a ``QuantizedTensor``
and keeps, on the CPU, the high-precision value it quantized: megatron-core's optimizers start their fp32 main
weights from that value (``get_high_precision_init_val``), not from the FP8 parameter. A model built to receive
loaded weights skips initialisation, so that value is the uninitialised memory the parameter was allocated in, and a
plain ``copy_`` of the loaded weight changes only the FP8 bytes: after the first optimizer step the loaded weights
are gone (zeros from fresh device memory, NaN or stale numbers from memory the caching allocator reused). Delayed
scaling has a second trap: quantizing that memory recorded its amax in the weight's amax history, and the history's
maximum sets the weight's scale for the next ``amax_history_len`` steps.

:func:`load_into_quantized` sets a quantized parameter to a loaded value and repairs both.
"""

from __future__ import annotations

import torch

__all__ = ["is_quantized_param", "load_into_quantized"]


def _is_te_class(obj: object, name: str) -> bool:
    """Whether ``obj``'s class is (a subclass of) Transformer Engine's class ``name``, without importing TE."""
    return any(c.__name__ == name and c.__module__.startswith("transformer_engine.") for c in type(obj).__mro__)


def is_quantized_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is one of Transformer Engine's quantized tensors (FP8 / FP4 weights)."""
    return _is_te_class(param, "QuantizedTensor")


@torch.no_grad()
def load_into_quantized(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set the TE quantized parameter ``param`` to ``value`` (its high-precision loaded weight, same shape).

    The parameter is quantized from ``value``; with delayed scaling (``Float8Quantizer``) its amax is first set to
    ``value``'s own (the amax-history entry of the earlier cast is discarded) and its scale to the largest that
    fits (``fp8_max / amax``, no margin: the recipe recomputes it, with its margin, after the first forward). The
    high-precision copy the optimizer's main weights start from becomes ``value`` in the parameter's dtype.
    """
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"value of shape {tuple(value.shape)} for a parameter of shape {tuple(param.shape)}")
    value = value.to(device=param.device, dtype=param.dtype)
    quantizer = param._get_quantizer()
    delayed = _is_te_class(quantizer, "Float8Quantizer")  # per-tensor delayed scaling (not current scaling's)
    if delayed:
        amax = value.abs().amax().float()
        fp8_max = torch.finfo(_torch_fp8_dtype(quantizer)).max
        quantizer.amax.copy_(amax)
        quantizer.scale.copy_(torch.where(amax > 0, fp8_max / amax, torch.ones_like(amax)))
    param.data.copy_(value)
    if delayed:
        param._scale_inv.copy_(quantizer.scale.reciprocal())
    if hasattr(param, "_high_precision_init_val"):
        param._high_precision_init_val = value.detach().cpu()


def _torch_fp8_dtype(quantizer) -> torch.dtype:
    return {"kFloat8E4M3": torch.float8_e4m3fn, "kFloat8E5M2": torch.float8_e5m2}[quantizer.dtype.name]
