"""One smoke test per CPU compatibility patch: each calls the megatron-core path the patch exists for; and the
layer is scoped: after the runtime is torn down, torch and megatron-core are exactly as before.

If a megatron-core upgrade moves one of these internals, the matching test fails here, by name.
"""

import sys
import types

import megatron.core.dist_checkpointing.exchange_utils  # noqa: F401  (in the pristine snapshot below)
import megatron.core.models.gpt  # noqa: F401
import megatron.core.optimizer  # noqa: F401
import megatron.core.pipeline_parallel  # noqa: F401
import pytest
import torch

from bridge_convert.runtime import _cpu_compat, cpu_compat, destroy_parallel, parallel_runtime
from bridge_convert.runtime._cpu_compat import CPU_PATCHES, applied_patches, apply_cpu_compat
from bridge_convert.testing import build_tiny_gpt

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is never applied with CUDA")


def _snapshot() -> dict:
    """Every entry of torch.cuda, torch.cuda.random and torch.Tensor, and every function, class and module bound in
    a megatron-core module or as a method of a megatron-core class (identity, not equality)."""
    snap = {("torch.cuda", k): v for k, v in vars(torch.cuda).items()}
    snap |= {("torch.cuda.random", k): v for k, v in vars(torch.cuda.random).items()}
    snap |= {("torch.Tensor", k): v for k, v in vars(torch.Tensor).items()}
    kinds = (types.FunctionType, types.ModuleType, type, staticmethod, classmethod)
    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.") or module is None:
            continue
        for key, value in list(vars(module).items()):
            if isinstance(value, kinds):
                snap[(name, key)] = value
            if isinstance(value, type) and value.__module__.startswith("megatron."):
                snap |= {(f"{value.__module__}.{value.__qualname__}", k): v for k, v in vars(value).items()
                         if isinstance(v, kinds)}
    return snap


def _behaviour() -> dict:
    """What a user sees from torch.cuda and CPU tensors on this CUDA-less machine."""
    out = {"type": torch.ones(1).type(), "type_cast": torch.ones(1).type(torch.float64).dtype}
    for label, call in (("cuda", lambda: torch.ones(1).cuda()), ("current_device", torch.cuda.current_device),
                        ("synchronize", torch.cuda.synchronize), ("current_stream", torch.cuda.current_stream)):
        try:
            out[label] = ("returned", repr(call()))
        except Exception as exc:  # the exact error a user would get
            out[label] = (type(exc).__name__, str(exc))
    return out


PRISTINE, PRISTINE_BEHAVIOUR = _snapshot(), _behaviour()  # taken at collection, before any test starts a runtime


def _assert_pristine() -> None:
    now = _snapshot()
    changed = sorted(f"{owner}.{key}" for (owner, key), value in PRISTINE.items()
                     if now.get((owner, key), "<missing>") is not value)
    assert changed == []
    assert _behaviour() == PRISTINE_BEHAVIOUR
    assert applied_patches() == ()


def test_a_conversion_leaves_torch_and_megatron_as_they_were(hf_checkpoints):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from bridge_convert import AutoBridge

    destroy_parallel()
    _assert_pristine()
    bridge = AutoBridge.from_hf_pretrained(hf_checkpoints["llama"])
    model = bridge.to_megatron_model(load_weights=True, wrap_with_ddp=True)
    assert applied_patches() == tuple(p.name for p in CPU_PATCHES)
    # While the runtime is up, user code outside megatron-core still sees honest CPU tensors.
    assert torch.ones(1).type() == "torch.FloatTensor"
    assert _behaviour()["cuda"] == PRISTINE_BEHAVIOUR["cuda"]
    get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=True),
                           model)  # the distributed optimizer's CUDA type checks
    assert dict(bridge.export_hf_weights(model)).keys()
    destroy_parallel()
    _assert_pristine()


def test_cpu_compat_and_parallel_runtime_are_context_managers():
    destroy_parallel()
    with cpu_compat() as names:
        assert names == tuple(p.name for p in CPU_PATCHES)
        assert torch.cuda.current_device() == torch.device("cpu")
        with parallel_runtime() as state:  # nested: leaves the outer block's patches in place
            assert state.world_size == 1
        assert torch.cuda.current_device() == torch.device("cpu")
    _assert_pristine()
    with parallel_runtime() as state:
        assert applied_patches() and state.tp_size == 1
    _assert_pristine()


def test_every_patch_has_a_smoke_test():
    tested = {name.removeprefix("test_patch_") for name in globals() if name.startswith("test_patch_")}
    assert {p.name for p in CPU_PATCHES} == tested


def test_patches_apply_once_and_are_listed(runtime):
    assert apply_cpu_compat() == tuple(p.name for p in CPU_PATCHES)
    assert apply_cpu_compat() == tuple(p.name for p in CPU_PATCHES)


def test_nothing_is_patched_when_cuda_is_available(monkeypatch):
    calls = []
    fake = tuple(_cpu_compat.CpuPatch(p.name, p.reason, lambda undo, n=p.name: calls.append(n)) for p in CPU_PATCHES)
    monkeypatch.setattr(_cpu_compat, "CPU_PATCHES", fake)
    monkeypatch.setattr(_cpu_compat, "_applied", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_cpu_compat() == ()
    assert calls == []


def test_patch_current_device(runtime):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0)
    emb = rope(8)  # moves inv_freq to torch.cuda.current_device()
    assert emb.device.type == "cpu" and emb.shape == (8, 1, 1, 16)


def test_patch_rng_tracker(runtime):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draw():
        model_parallel_cuda_manual_seed(7, force_reset_rng=True)
        torch.manual_seed(99)
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        after = torch.rand(4)
        return forked, after

    forked_a, after_a = draw()
    forked_b, after_b = draw()
    torch.testing.assert_close(forked_a, forked_b, rtol=0, atol=0)  # the tracker state is seeded
    torch.manual_seed(99)
    torch.testing.assert_close(after_a, torch.rand(4), rtol=0, atol=0)  # the default stream is untouched by the fork
    assert not torch.equal(forked_a, after_a)


def test_patch_synchronize(runtime):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    buckets = [("f", "k", ([], [("item", torch.ones(3))]))]
    loaded = FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True)  # calls torch.cuda.synchronize()
    assert torch.equal(loaded[0][2][1][0][1], torch.ones(3))


def test_patch_streams(runtime):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model = build_tiny_gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
    ids = torch.randint(0, 128, (2, 8))
    ddp(ids, torch.arange(8).expand(2, 8), None, labels=ids).mean().backward()
    ddp.finish_grad_sync()  # start_grad_sync asks for torch.cuda.current_stream()
    assert all(p.main_grad.abs().sum() > 0 for p in model.parameters())


def test_patch_hardcoded_cuda_buffers(runtime):
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron.core.transformer.utils import get_default_causal_mask

    assert get_default_causal_mask(4).device.type == "cpu"
    model = build_tiny_gpt()
    batches = iter([torch.randint(0, 128, (2, 8)) for _ in range(2)])

    def step(it, m):
        ids = next(it)
        return m(ids, torch.arange(8).expand(2, 8), None, labels=ids), lambda out: (out.mean(), {})

    forward_backward_no_pipelining(forward_step_func=step, data_iterator=batches, model=[model], num_microbatches=2,
                                   seq_length=8, micro_batch_size=2)  # its token counter is made on "cuda"
    grads = [p.grad for p in model.parameters()]
    norm = get_grad_norm_fp32(grads)  # the l2-norm fallback returns a "cuda" tensor
    torch.testing.assert_close(torch.tensor(norm), torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))


def test_patch_tensor_type_and_cuda(runtime):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build_tiny_gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                  module=model)
    # The distributed optimizer checks param.type() == "torch.cuda.FloatTensor"; clipping asserts the same.
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1e-3,
                                                 use_distributed_optimizer=True), [ddp])
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 128, (2, 8))
    ddp(ids, torch.arange(8).expand(2, 8), None, labels=ids).mean().backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 1e-3
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # broadcast_data moves its inputs with .cuda(); it is re-exported by name from megatron.core.tensor_parallel.
    from megatron.core.tensor_parallel import broadcast_data

    data = {"tokens": torch.randint(0, 128, (2, 8))}
    assert torch.equal(broadcast_data(["tokens"], data, torch.int64)["tokens"], data["tokens"])
    # Outside megatron-core, CPU tensors still describe themselves honestly.
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()
