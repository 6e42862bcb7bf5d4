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


def test_cuda_compiled_layers_match_eager(runtime):
    """compile_layers with inductor's CUDA kernels computes the eager layer's loss and gradients (fp32)."""
    from _native_models import build, copy_weights, randomise_norms

    eager = build("native", seed=0)
    randomise_norms(eager)
    compiled = build("native", seed=1, compile_layers=True)
    copy_weights(eager, compiled)
    eager, compiled = eager.cuda(), compiled.cuda()
    losses = _train_step_losses(eager, compiled)
    assert _rel(losses[1], losses[0]) < 1e-5
    g_eager, g_compiled = grads(eager), grads(compiled)
    assert g_eager.keys() == g_compiled.keys()
    worst = max(_rel(g_compiled[k], g_eager[k]) for k in g_eager)
    assert worst < 1e-4, worst
