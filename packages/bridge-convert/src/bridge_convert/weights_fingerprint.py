"""A small summary of a model's weights that tells two bases apart at any layout and dtype.

An adapter-only checkpoint keeps no base weights, so what merges or resumes its adapters cannot see whether the base
it is given is the one they were trained on: a model of the same shape (an instruct variant, another fine-tune, a
re-initialised copy) merges without an error into a model nobody trained. The fingerprint is the projections of the
first attention head's query rows of global layer 0 (megatron's fused ``linear_qkv`` rows ``[0, kv_channels)``, on
tensor-parallel rank 0 at every TP) onto a fixed +-1 vector. Rounding (an fp32 base trained in bf16, merged in
fp16) moves the projections by up to about 4e-3 of their rows' norm (measured: 3.3e-3 for bf16 on a tiny Llama);
:func:`same_weights` allows 1e-2, while weights moved by 1% of themselves (random relative changes, as a
fine-tune of the base makes) move them by 2.5e-2, by 5% 0.12.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["base_weights_fingerprint", "same_weights"]

_TOLERANCE = 1e-2
_WEIGHTS = "decoder.layers.0.self_attention.linear_qkv.weight[:kv_channels]"


def base_weights_fingerprint(model: list) -> dict[str, Any] | None:
    """The fingerprint of ``model`` (this rank's chunks) where this rank holds those rows, else None (other ranks,
    a pipeline layout whose first stage holds no decoder layer, weights kept in FP8)."""
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    chunk = unwrap_model(model[0])
    layers = getattr(getattr(chunk, "decoder", None), "layers", None)
    if not layers or getattr(layers[0], "layer_number", None) != 1:
        return None
    weight = getattr(getattr(layers[0].self_attention, "linear_qkv", None), "weight", None)
    if weight is None or type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point \
            or weight.dtype.itemsize < 2:  # Transformer Engine's FP8 weights: their rounding is too coarse
        return None
    head_dim = chunk.config.kv_channels or chunk.config.hidden_size // chunk.config.num_attention_heads
    rows = weight.detach()[:head_dim].to(device="cpu", dtype=torch.float64)
    signs = torch.randint(0, 2, (rows.shape[1],), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    return {"weights": _WEIGHTS, "projections": [float(f"{p:.8g}") for p in (rows @ signs).tolist()],
            "scale": float(f"{float(rows.norm(dim=1).max()):.8g}")}


def same_weights(recorded: Any, current: Any) -> bool | None:
    """Whether two fingerprints come from the same weights (to rounding); None when either is missing or they
    summarise different things (nothing to compare)."""
    if not (isinstance(recorded, dict) and isinstance(current, dict)) or recorded.get("weights") != current.get(
            "weights") or len(recorded.get("projections") or ()) != len(current.get("projections") or ()):
        return None
    try:
        scale = max(float(recorded["scale"]), float(current["scale"]))
        gap = max(abs(float(a) - float(b)) for a, b in zip(recorded["projections"], current["projections"]))
    except (KeyError, TypeError, ValueError):  # a hand-edited record
        return None
    return gap <= _TOLERANCE * scale
