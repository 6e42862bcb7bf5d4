"""The native spec's CUDA paths (SDPA flash/cuDNN, FlexAttention for packed rows, compiled RoPE and loss kernels,
liger's RMSNorm when it imports) against the local spec on the same GPU. Runs on the lent GPU machines only."""

import pytest
import torch
from _native_models import grads, pair
from megatron.core.packed_seq_params import PackedSeqParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

B, S, V = 2, 256, 128


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _train_step_losses(*models) -> list[torch.Tensor]:
    """Per-token losses of each model on one random batch, after the backward of their masked mean."""
    ids = torch.randint(0, V, (B, S), device="cuda")
    pos = torch.arange(S, device="cuda").expand(B, S)
    mask = torch.ones(B, S, device="cuda")
    losses = []
    for model in models:
        loss = model(ids, pos, None, labels=ids, loss_mask=mask)
        ((loss * mask).sum() / mask.sum()).backward()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("overrides", [{}, {"qk_layernorm": True, "kv_channels": 32}, {"window_size": (31, 0)},
                                       {"bias_activation_fusion": True}],
                         ids=["llama", "qwen3", "sliding-window", "fused-swiglu"])
def test_cuda_native_matches_local(runtime, dtype, overrides):
    local, native = (m.to(device="cuda", dtype=dtype) for m in pair(**overrides))
    losses = _train_step_losses(local, native)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _rel(losses[1], losses[0]) < tol
    g_local, g_native = grads(local), grads(native)
    worst = max(_rel(g_native[k], g_local[k]) for k in g_local)
    assert worst < (1e-3 if dtype == torch.float32 else 5e-2), worst


def test_cuda_packed_rows_match_documents_alone(runtime):
    local, native = (m.cuda() for m in pair())
    lengths = [100, 60, 96]
    docs = [torch.randint(0, V, (1, n), device="cuda") for n in lengths]
    cu = torch.tensor([0, 100, 160, 256], dtype=torch.int32, device="cuda")
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=100, max_seqlen_kv=100)
    ids = torch.cat(docs, dim=1)
    packed = native(ids, torch.zeros_like(ids), None, packed_seq_params=params)
    alone = torch.cat([local(d, torch.arange(d.shape[1], device="cuda").unsqueeze(0), None) for d in docs], dim=1)
    assert _rel(packed, alone) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [1000, 4096])
def test_triton_swiglu_matches_torch_eager(dtype, width):
    import torch.nn.functional as F

    from bridge_convert.native.swiglu import swiglu, swiglu_kernels_available

    assert swiglu_kernels_available()
    y0 = torch.randn(3, 5, 2 * width, device="cuda", dtype=dtype)
    grad = torch.randn(3, 5, width, device="cuda", dtype=dtype)
    ref_y = y0.clone().requires_grad_()
    gate, up = ref_y.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    ref.backward(grad)
    y = y0.clone().requires_grad_()
    out = swiglu(y)
    out.backward(grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(y.grad, ref_y.grad, **tol)
    if dtype == torch.bfloat16:
        # silu rounded to bf16, then one rounded product, like eager: nearly all elements bit-identical
        assert (out != ref).float().mean().item() < 0.01


def test_torch_wgrad_accumulation_uses_fp32_output_gemm():
    from bridge_convert.native import wgrad
    from bridge_convert.native.wgrad import TorchWgradAccumulation

    x = torch.randn(4, 64, 256, device="cuda").to(torch.bfloat16)
    dy = torch.randn(4, 64, 128, device="cuda").to(torch.bfloat16)
    start = torch.randn(128, 256, device="cuda")
    main_grad = start.clone()
    TorchWgradAccumulation.wgrad_gemm_accum_fp32(x, dy, main_grad)
    assert wgrad._DTYPE_OUT_WORKS, "torch.addmm(out_dtype=float32) unavailable on this torch"
    want = start.double() + dy.reshape(-1, 128).double().t() @ x.reshape(-1, 256).double()
    torch.testing.assert_close(main_grad.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_fused_wgrad_and_swiglu_training_step_matches_unfused(runtime, dtype):
    from _native_models import TINY
    from megatron.core.distributed import DistributedDataParallelConfig

    from bridge_convert.provider import GPTModelProvider

    def build(fused: bool):
        provider = GPTModelProvider(transformer_impl="native", gradient_accumulation_fusion=fused,
                                    bias_activation_fusion=fused, params_dtype=dtype, **TINY)
        (model,) = provider.provide_distributed_model(
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False))
        return model

    plain, fused = build(False), build(True)
    with torch.no_grad():  # GPU init draws from the CUDA RNG tracker: give both the same weights
        for (name, p), (name2, q) in zip(plain.named_parameters(), fused.named_parameters(), strict=True):
            assert name == name2
            q.copy_(p)
    ids = torch.randint(0, TINY["vocab_size"], (2, 64), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    pos = torch.arange(64, device="cuda").expand(2, 64)
    main_grads = []
    for model in (plain, fused):
        model.zero_grad_buffer()
        for _ in range(2):  # two micro-batches: the second accumulates onto the first
            loss = model(ids, pos, None, labels=ids, loss_mask=torch.ones(2, 64, device="cuda"))
            loss.float().mean().backward()
        main_grads.append({n: p.main_grad.detach().clone() for n, p in model.module.named_parameters()})
    plain_grads, fused_grads = main_grads
    rel = {k: _rel(fused_grads[k], plain_grads[k]) for k in plain_grads}
    worst = max(rel, key=rel.get)
    assert rel[worst] < (1e-5 if dtype == torch.float32 else 2e-2), (worst, rel)
    assert all(g.abs().sum() > 0 for g in fused_grads.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_recomputed_swiglu_output_matches_kept_output(runtime, dtype):
    from _native_models import build, copy_weights

    kept = build("native", bias_activation_fusion=True).to(device="cuda", dtype=dtype)
    lean = build("native", 1, bias_activation_fusion=True, recompute_activation_output=True).to("cuda", dtype)
    copy_weights(kept, lean)
    losses = _train_step_losses(kept, lean)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)  # the same kernels in the same order
    g_kept, g_lean = grads(kept), grads(lean)
    assert max(_rel(g_lean[k], g_kept[k]) for k in g_kept) == 0.0


@pytest.mark.parametrize("clip", [1.0, 1e-3], ids=["unclipped", "clipped"])
def test_cuda_fused_mixed_precision_adam_matches_megatron_step(runtime, clip):
    """megatron's bf16 optimizer stepping through the fused kernel (grad clip folded in, model copy in the same
    pass) == its own path (clip pass, torch AdamW, main->model copy) on one step from the same state, and == a
    float64 AdamW on every step of three."""
    from _native_models import TINY
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from bridge_convert.native.optimizer import use_fused_optimizer_kernels
    from bridge_convert.provider import GPTModelProvider

    def build(fused: bool):
        provider = GPTModelProvider(transformer_impl="native", params_dtype=torch.bfloat16, bf16=True, **TINY)
        (model,) = provider.provide_distributed_model(
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False))
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                            clip_grad=clip, bf16=True, params_dtype=torch.bfloat16), [model])
        if fused:
            assert "Float16OptimizerWithFloat16Params.step_with_ready_grads" in use_fused_optimizer_kernels(optimizer)
        (inner,) = getattr(optimizer, "chained_optimizers", [optimizer])
        return model, optimizer, inner

    (plain, plain_opt, _), (fused, fused_opt, inner) = build(False), build(True)
    with torch.no_grad():
        for p, q in zip(plain.parameters(), fused.parameters(), strict=True):
            q.copy_(p)
    for opt in (plain_opt, fused_opt):  # the fp32 main params start from the copied bf16 weights
        opt.reload_model_params()
    pairs = [(model_param, main_param) for model_group, main_group in
             zip(inner.float16_groups, inner.fp32_from_float16_groups, strict=True)
             for model_param, main_param in zip(model_group, main_group, strict=True)]
    hyper = {id(p): g for g in inner.optimizer.param_groups for p in g["params"]}
    gen = torch.Generator(device="cuda").manual_seed(3)
    for step in range(1, 4):
        ids = torch.randint(0, TINY["vocab_size"], (2, 64), device="cuda", generator=gen)
        pos = torch.arange(64, device="cuda").expand(2, 64)
        norms = []
        for model, opt in ((plain, plain_opt), (fused, fused_opt)):
            model.zero_grad_buffer()
            opt.zero_grad()
            loss = model(ids, pos, None, labels=ids, loss_mask=torch.ones(2, 64, device="cuda"))
            loss.float().mean().backward()
            if opt is fused_opt:  # float64 reference of this step from the fused optimizer's own state
                before = []
                for model_param, main_param in pairs:
                    state = inner.optimizer.state.get(main_param, {})
                    before.append((main_param.double(), model_param.main_grad.double(),
                                   state["exp_avg"].double() if state else torch.zeros_like(main_param.double()),
                                   state["exp_avg_sq"].double() if state else torch.zeros_like(main_param.double())))
            ok, norm, _ = opt.step()
            assert ok
            norms.append(norm)
        coeff = min(1.0, clip / (norms[1] + 1e-6))
        for (model_param, main_param), (p0, g, m, v) in zip(pairs, before, strict=True):
            # the clip's scale was applied inside the step, not by an in-place pass over the grads
            assert torch.equal(model_param.main_grad.double(), g)
            group = hyper[id(main_param)]
            (b1, b2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
            g = g * coeff
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            want = p0 * (1 - lr * wd) - lr / (1 - b1 ** step) * m / (v.sqrt() / (1 - b2 ** step) ** 0.5 + 1e-8)
            torch.testing.assert_close(main_param.double(), want, rtol=1e-5, atol=1e-7)
            assert torch.equal(model_param, main_param.to(model_param.dtype))  # the copy made in the same pass
        if step == 1:  # same weights, same batch: megatron's own path gives the same step
            assert norms[1] == pytest.approx(norms[0], rel=1e-6)
            for a, b in zip(plain_opt.get_parameters(), fused_opt.get_parameters(), strict=True):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        # later steps: one bf16 ulp of a weight rounding the other way is enough for the two runs to part
