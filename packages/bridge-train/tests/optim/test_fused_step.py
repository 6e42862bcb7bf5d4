"""The foreach replacements for megatron-core's multi-tensor fallbacks compute what the fallbacks compute."""

import torch
from megatron.core import utils as mc_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as mc_optimizer

from bridge_train.optim.fused_step import _foreach_l2_norm, _foreach_scale, use_fused_optimizer_kernels


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in ((7, 3), (5,), (4, 4, 2))]


def test_foreach_l2_norm_matches_megatron_fallback(runtime):
    tensors = _tensors()
    flag = torch.zeros(1, dtype=torch.int)
    want, _ = mc_utils.local_multi_tensor_l2_norm(2048, flag, [tensors], False)
    got, _ = _foreach_l2_norm(2048, flag, [tensors], False)
    torch.testing.assert_close(got, want.to(got.device), rtol=1e-6, atol=0)


def test_foreach_scale_matches_megatron_fallback(runtime):
    src = _tensors()
    want = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    got = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    flag = torch.zeros(1, dtype=torch.int)
    for scale in (1.0, 0.37):
        mc_utils.local_multi_tensor_scale(2048, flag, [src, want], scale)
        _foreach_scale(2048, flag, [src, got], scale)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_use_fused_optimizer_kernels_swaps_only_megatron_fallbacks(runtime, monkeypatch):
    """The fallbacks megatron-core uses without TE / apex are replaced; a real multi-tensor kernel (what
    megatron-core picks up from TE or apex) and CPU torch optimizers are left exactly as they were."""
    def installed_kernel(*args):  # stands in for TE's / apex's multi_tensor_applier-backed implementation
        raise AssertionError("not called here")

    monkeypatch.setattr(clip_grads, "l2_norm_impl", mc_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", installed_kernel)
    monkeypatch.setattr(mc_optimizer, "multi_tensor_scale_impl", mc_utils.local_multi_tensor_scale)
    cpu_param = torch.nn.Parameter(torch.randn(4, 3))
    cpu_adam = torch.optim.AdamW([cpu_param], lr=1e-3)
    groups_before = [dict(g) for g in cpu_adam.param_groups]

    changed = use_fused_optimizer_kernels(cpu_adam)

    assert sorted(changed) == ["clip_grads.l2_norm_impl", "optimizer.multi_tensor_scale_impl"]
    assert clip_grads.l2_norm_impl is _foreach_l2_norm
    assert mc_optimizer.multi_tensor_scale_impl is _foreach_scale
    assert clip_grads.multi_tensor_scale_impl is installed_kernel  # not a fallback: kept
    assert cpu_adam.param_groups == groups_before  # CPU params: torch's fused AdamW is CUDA-only, untouched
    assert not getattr(cpu_adam, "_bridge_fused_step", False)
    assert use_fused_optimizer_kernels(cpu_adam) == []  # idempotent
    assert clip_grads.multi_tensor_scale_impl is installed_kernel


def test_foreach_scale_in_place_clip_matches_megatron_fallback(runtime):
    # The grad-norm clip calls multi_tensor_scale with the same list as source and destination.
    want, got = _tensors(1), _tensors(1)
    flag = torch.zeros(1, dtype=torch.int)
    for scale in (0.37, 1.0):
        mc_utils.local_multi_tensor_scale(2048, flag, [want, want], scale)
        _foreach_scale(2048, flag, [got, got], scale)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_in_place_clip_of_fused_optimizer_grads_is_left_to_the_step(runtime):
    # The grad-norm clip's in-place scale of main grads that a fused step owns is recorded, not applied; the step
    # multiplies each grad by its own recorded factor. Lists with any other tensor are scaled for real.
    import weakref

    from bridge_train.optim import fused_step as native_optimizer

    class Owner:
        pass

    owner = Owner()
    grads = _tensors(2)
    before = [g.clone() for g in grads]
    for g in grads:
        native_optimizer._DEFERRED_GRADS[g.data_ptr()] = (weakref.ref(owner), weakref.ref(g))
    try:
        flag = torch.zeros(1, dtype=torch.int)
        _foreach_scale(2048, flag, [grads[:2], grads[:2]], 0.5)
        _foreach_scale(2048, flag, [grads[:1], grads[:1]], 0.25)  # a separate grad-norm group, clipped again
        for g, b in zip(grads, before, strict=True):
            assert torch.equal(g, b)
        assert owner._bridge_grad_scales == {grads[0].data_ptr(): 0.125, grads[1].data_ptr(): 0.5}
        alias = grads[1].detach()  # what megatron's clip passes: another tensor object over the same grad
        _foreach_scale(2048, flag, [[alias], [alias]], 2.0)
        assert torch.equal(grads[1], before[1]) and owner._bridge_grad_scales[grads[1].data_ptr()] == 1.0
        flat = grads[2].view(-1)  # the same memory seen as another shape: not that grad, scaled for real
        _foreach_scale(2048, flag, [[flat], [flat]], 2.0)
        torch.testing.assert_close(grads[2], before[2] * 2.0)
        grads[2].copy_(before[2])
        other = torch.ones(3)
        _foreach_scale(2048, flag, [[grads[2], other], [grads[2], other]], 0.5)  # not all owned: scaled for real
        torch.testing.assert_close(grads[2], before[2] * 0.5)
        torch.testing.assert_close(other, torch.full((3,), 0.5))
        del owner  # a dead owner defers nothing
        _foreach_scale(2048, flag, [grads[:1], grads[:1]], 0.5)
        torch.testing.assert_close(grads[0], before[0] * 0.5)
    finally:
        for g in grads:
            native_optimizer._DEFERRED_GRADS.pop(g.data_ptr(), None)
