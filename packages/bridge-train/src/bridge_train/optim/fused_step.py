"""torch-native fast kernels for megatron-core's optimizer step when neither Transformer Engine nor apex is there.

Without TE / apex, megatron-core's mixed-precision optimizer falls back to (a) ``torch.optim.AdamW`` with its
default multi-tensor (foreach) implementation, and (b) Python fallbacks for its multi-tensor helpers:
``local_multi_tensor_l2_norm`` (one norm kernel *and one host sync* per parameter for the grad-norm clip) and
``local_multi_tensor_scale`` (one multiply and one copy per parameter, used to copy the fp32 main params back
into the bf16 model params and to scale gradients). On a 1B model that is tens of milliseconds per step.
:func:`use_fused_optimizer_kernels` swaps in torch's fused AdamW kernel and ``torch._foreach_*`` versions of
the helpers: the same arithmetic (fp32 main params, fp32 norms), a handful of kernels.

For megatron's bf16 / fp16 mixed-precision optimizer (``Float16OptimizerWithFloat16Params``) it goes one step
further: :func:`fused_adam_step` runs the whole parameter update as one Triton kernel per parameter, reading the
fp32 main param, its fp32 grad and the two fp32 moments once and writing the main param, the moments *and the
bf16 model param* in the same pass, instead of torch's fused AdamW followed by megatron's separate main -> model
copy (one fewer read of the fp32 params, one fewer pass). The grad-norm clip's in-place scaling of those fp32
grads (through ``multi_tensor_scale_impl``) is recorded instead and applied by the kernel as it reads each
gradient: one pass over the grads fewer. The state it keeps is torch AdamW's (``step``, ``exp_avg``,
``exp_avg_sq`` in ``optimizer.state[main_param]``), so checkpoints move freely between the two. Between the
clip and the step the grads are left unscaled (megatron's ``step()`` reads none of them there).
"""

from __future__ import annotations

import functools
import types
import weakref

import torch

__all__ = ["fused_adam_step", "use_fused_optimizer_kernels"]

_BLOCK = 2048


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm`` (the total norm of ``tensor_lists[0]``; no per-tensor norms)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors], 2.0)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


_DEFERRED_GRADS: dict[int, tuple[weakref.ref, weakref.ref]] = {}
"""``data_ptr`` of a main grad -> weak references to (the fused mixed-precision optimizer that steps it, the grad
tensor). Deferred are only tensors viewing that grad's memory with its shape and dtype while it is alive (megatron
passes ``param.grad.detach()``, a new tensor object over the same memory)."""


def _defer_in_place_scale(tensors, scale: float) -> bool:
    """Record ``tensors *= scale`` for the fused step to apply, if every tensor is a main grad of a fused optimizer.

    megatron's grad-norm clip scales the fp32 main grads in place through ``multi_tensor_scale_impl`` just before
    the step; a fused step multiplies each gradient by its recorded scale as it reads it instead (one pass over
    the grads fewer). Anything else (another tensor in the list, no live owner) is scaled for real.
    """
    owners = []
    for t in tensors:
        refs = _DEFERRED_GRADS.get(t.data_ptr()) if t.numel() else None
        grad = refs[1]() if refs is not None else None
        owner = refs[0]() if grad is not None and grad.shape == t.shape and grad.dtype == t.dtype else None
        if owner is None:
            return False
        owners.append(owner)
    for t, owner in zip(tensors, owners, strict=True):
        scales = owner.__dict__.setdefault("_bridge_grad_scales", {})
        scales[t.data_ptr()] = scales.get(t.data_ptr(), 1.0) * scale
    return True


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` over two tensor lists (any dtypes)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if scale == 1.0:
        if any(s is not d for s, d in zip(src, dst)):
            torch._foreach_copy_(dst, src)
    elif all(s is d for s, d in zip(src, dst)):
        # The grad-norm clip scales the grads in place: left to the fused step when it owns them all, else no copies.
        if not _defer_in_place_scale(dst, float(scale)):
            torch._foreach_mul_(dst, scale)
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


@functools.cache
def _adam_kernel():
    from ._adamw_triton import adam_step_kernel  # imports triton: only where the kernel is about to run

    return adam_step_kernel


def _supports_fused_adam(opt) -> bool:
    """A torch Adam / AdamW whose groups use only what :func:`fused_adam_step` implements."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    for group in opt.param_groups:
        if any(group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable")):
            return False
        if torch.is_tensor(group["lr"]) or any(p.dtype != torch.float32 for p in group["params"]):
            return False
    return True


@torch.no_grad()
def fused_adam_step(opt, model_params: dict | None = None, grad_scales: dict | None = None) -> None:
    """One step of the torch ``Adam`` / ``AdamW`` ``opt``, computed by the fused Triton kernel.

    The same update as ``opt.step()`` (torch's formula, fp32 arithmetic, ``weight_decay`` decoupled for AdamW and
    added to the gradient for Adam) on the same state (``step``, ``exp_avg``, ``exp_avg_sq``, created as torch
    creates them). ``model_params`` maps a parameter of ``opt`` to a lower-precision model tensor (same shape)
    that receives the updated value, cast, in the same pass. ``grad_scales`` maps a parameter to a factor its
    gradient is multiplied by as it is read (a grad-norm clip's coefficient; default 1), as if the gradient had
    been scaled in place first. Parameters without a gradient are skipped.
    Needs contiguous fp32 parameters, gradients and moments (what megatron's main params are); raises otherwise.
    """
    kernel = _adam_kernel()
    model_params = model_params or {}
    grad_scales = grad_scales or {}
    decoupled = isinstance(opt, torch.optim.AdamW)
    work = []
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            model = model_params.get(p)
            state = opt.state[p]
            moments = [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
            if any(not t.is_contiguous() or t.dtype != torch.float32 for t in [p, *moments]):
                raise ValueError("fused_adam_step needs contiguous fp32 parameters and moments")
            if not p.grad.is_contiguous():
                raise ValueError("fused_adam_step needs contiguous gradients")
            if model is not None and (model.shape != p.shape or not model.is_contiguous()):
                raise ValueError(f"model param {tuple(model.shape)} does not match its main param "
                                 f"{tuple(p.shape)} (or is not contiguous)")
            work.append((group, p, state, model))
    if not work:
        return
    for _, p, state, _ in work:  # state created as torch creates it, once every input is known to be good
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = [state["step"] for _, _, state, _ in work]
    torch._foreach_add_(steps, 1.0)
    counts = torch.stack([s.to(work[0][1].device, torch.float64) for s in steps]).tolist()  # one host sync
    for (group, p, state, model), count in zip(work, counts, strict=True):
        beta1, beta2 = group["betas"]
        lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
        n = p.numel()
        if n == 0:
            continue
        kernel[((n + _BLOCK - 1) // _BLOCK,)](
            p, p.grad, state["exp_avg"], state["exp_avg_sq"], model if model is not None else p, n,
            float(grad_scales.get(p, 1.0)), lr, beta1, beta2, group["eps"], weight_decay,
            lr / (1.0 - beta1 ** count), (1.0 - beta2 ** count) ** 0.5,  # torch's bias corrections, in float64
            DECOUPLED=decoupled, COPY=model is not None, BLOCK=_BLOCK,
        )


def _fused_mixed_precision_step(self) -> bool:
    """``Float16OptimizerWithFloat16Params.step_with_ready_grads`` as one fused pass per parameter.

    The inner optimizer's update and megatron's ``_copy_main_params_to_model_params`` together: the kernel
    writes each updated fp32 main param into its bf16 / fp16 model param as it goes.
    """
    deferred = self.__dict__.pop("_bridge_grad_scales", {})
    if self.is_stub_optimizer:
        return True
    model_params = {}
    for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups, strict=True):
        for model_param, main_param in zip(model_group, main_group, strict=True):
            model_params[main_param] = model_param.data
    scales = {}
    if deferred:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.data_ptr() in deferred:
                    scales[p] = deferred[p.grad.data_ptr()]
    fused_adam_step(self.optimizer, model_params, scales)
    return True


def _prepare_grads_resetting_deferred_scales(self, prepare_grads) -> bool:
    """A step starts with no deferred grad scales (a skipped update must not carry its clip into the next)."""
    self.__dict__.pop("_bridge_grad_scales", None)
    return prepare_grads()


def _fuse_mixed_precision_steps(optimizer) -> list[str]:
    """Route the step of each fuseable megatron ``Float16OptimizerWithFloat16Params`` through the fused kernel."""
    try:
        from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
    except Exception:
        return []
    changed = []
    stack = [optimizer]
    while stack:
        opt = stack.pop()
        stack.extend(getattr(opt, "chained_optimizers", []) or [])
        if type(opt) is not Float16OptimizerWithFloat16Params or getattr(opt, "_bridge_fused_step", False):
            continue
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"]] if inner is not None else []
        config = opt.config
        if (not params or not all(p.is_cuda for p in params) or not _supports_fused_adam(inner)
                or getattr(config, "reuse_grad_buf_for_mxfp8_param_ag", False)):
            continue
        try:
            _adam_kernel()
        except Exception:  # no importable Triton: keep torch's fused AdamW + the separate copy
            continue
        opt.step_with_ready_grads = types.MethodType(_fused_mixed_precision_step, opt)
        opt.prepare_grads = functools.partial(_prepare_grads_resetting_deferred_scales, opt, opt.prepare_grads)
        opt._bridge_fused_step = True
        for model_group in opt.float16_groups:
            for model_param in model_group:
                main_grad = getattr(model_param, "main_grad", None)
                if main_grad is not None and main_grad.numel():
                    _DEFERRED_GRADS[main_grad.data_ptr()] = (weakref.ref(opt), weakref.ref(main_grad))
        changed.append(f"{type(opt).__name__}.step_with_ready_grads")
    return changed


def use_fused_optimizer_kernels(optimizer) -> list[str]:
    """Make a megatron-core optimizer's step use fused / multi-tensor kernels; returns what changed.

    Switches every ``torch.optim.Adam``/``AdamW`` inside ``optimizer`` whose parameters all live on one CUDA
    device to ``fused=True``, and replaces megatron-core's Python fallbacks for ``multi_tensor_l2norm`` /
    ``multi_tensor_scale`` (only if those fallbacks are what megatron-core is using, i.e. TE and apex are
    absent) with ``torch._foreach`` versions. Each mixed-precision ``Float16OptimizerWithFloat16Params`` over
    CUDA params with a plain Adam / AdamW then steps through :func:`fused_adam_step` (update and model-param
    copy in one pass) when Triton imports. The fallback swap is process-wide and idempotent; call it once after
    ``get_megatron_optimizer``.
    """
    changed = _patch_multi_tensor_fallbacks()
    changed += _fuse_mixed_precision_steps(optimizer)
    for opt in _torch_optimizers(optimizer):
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for i, group in enumerate(opt.param_groups):
            params = group["params"]
            if params and all(p.is_cuda and p.is_floating_point() for p in params) and not group.get("fused"):
                group["fused"], group["foreach"] = True, False
                changed.append(f"{type(opt).__name__}.param_groups[{i}].fused")
    return changed
