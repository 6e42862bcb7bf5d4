"""torch-native fast kernels for megatron-core's optimizer step when neither Transformer Engine nor apex is there.

Without TE / apex, megatron-core's mixed-precision optimizer falls back to (a) ``torch.optim.AdamW`` with its
default multi-tensor (foreach) implementation, and (b) Python fallbacks for its multi-tensor helpers:
``local_multi_tensor_l2_norm`` (one norm kernel *and one host sync* per parameter for the grad-norm clip) and
``local_multi_tensor_scale`` (one multiply and one copy per parameter, used to copy the fp32 main params back
into the bf16 model params and to scale gradients). On a 1B model that is tens of milliseconds per step.
:func:`use_fused_optimizer_kernels` swaps in torch's fused AdamW kernel and ``torch._foreach_*`` versions of
the helpers: the same arithmetic (fp32 main params, fp32 norms), a handful of kernels.
"""

from __future__ import annotations

import torch

__all__ = ["use_fused_optimizer_kernels"]


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (the total norm of ``tensor_lists[0]``; no per-tensor norms)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors], 2.0)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` over two tensor lists (any dtypes)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if scale == 1.0:
        if any(s is not d for s, d in zip(src, dst)):
            torch._foreach_copy_(dst, src)
    elif all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)  # the grad-norm clip scales the grads in place: no temporary copies
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _patch_multi_tensor_fallbacks() -> list[str]:
    from megatron.core import utils as mc_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mc_optimizer

    patched = []
    if getattr(clip_grads, "l2_norm_impl", None) is mc_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
        patched.append("clip_grads.l2_norm_impl")
    for module in (clip_grads, mc_optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is mc_utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale
            patched.append(f"{module.__name__.rsplit('.', 1)[-1]}.multi_tensor_scale_impl")
    return patched


def _torch_optimizers(optimizer):
    """The torch optimizers inside a (chained) megatron-core optimizer."""
    stack, seen = [optimizer], []
    while stack:
        opt = stack.pop()
        if isinstance(opt, torch.optim.Optimizer):
            seen.append(opt)
            continue
        stack.extend(getattr(opt, "chained_optimizers", []) or [])
        inner = getattr(opt, "optimizer", None)
        if inner is not None and inner is not opt:
            stack.append(inner)
    return seen


def use_fused_optimizer_kernels(optimizer) -> list[str]:
    """Make a megatron-core optimizer's step use fused / multi-tensor torch kernels; returns what changed.

    Switches every ``torch.optim.Adam``/``AdamW`` inside ``optimizer`` whose parameters all live on one CUDA
    device to ``fused=True``, and replaces megatron-core's Python fallbacks for ``multi_tensor_l2norm`` /
    ``multi_tensor_scale`` (only if those fallbacks are what megatron-core is using, i.e. TE and apex are
    absent) with ``torch._foreach`` versions. The fallback swap is process-wide and idempotent; call it once
    after ``get_megatron_optimizer``.
    """
    changed = _patch_multi_tensor_fallbacks()
    for opt in _torch_optimizers(optimizer):
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for i, group in enumerate(opt.param_groups):
            params = group["params"]
            if params and all(p.is_cuda and p.is_floating_point() for p in params) and not group.get("fused"):
                group["fused"], group["foreach"] = True, False
                changed.append(f"{type(opt).__name__}.param_groups[{i}].fused")
    return changed
