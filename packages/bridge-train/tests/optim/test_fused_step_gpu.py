"""The fused optimizer step on a GPU: the compiled Triton kernel inside megatron-core's bf16 optimizer.

Runs on the lent GPU machines only (``bash tools/gpu/run_checks.sh optim``).
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=128, seq_length=64, rotary_base=10000.0, make_vocab_size_divisible_by=64)


def _te_importable() -> bool:
    from bridge_convert.specs import te_available

    return te_available()


def test_with_transformer_engine_nothing_is_replaced(runtime):
    """With TE, megatron-core steps with TE's FusedAdam and multi-tensor kernels: nothing of its to replace."""
    if not _te_importable():
        pytest.skip("checks the TE case")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from bridge_convert.provider import GPTModelProvider
    from bridge_train.optim import use_fused_optimizer_kernels

    provider = GPTModelProvider(transformer_impl="native", params_dtype=torch.bfloat16, bf16=True, **TINY)
    (model,) = provider.provide_distributed_model(ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, bf16=True,
                                                       params_dtype=torch.bfloat16), [model])
    (inner,) = getattr(optimizer, "chained_optimizers", [optimizer])
    assert type(inner.optimizer).__module__.startswith("transformer_engine"), type(inner.optimizer)
    assert use_fused_optimizer_kernels(optimizer) == []


@pytest.mark.parametrize("clip", [1.0, 1e-3], ids=["unclipped", "clipped"])
def test_cuda_fused_mixed_precision_adam_matches_megatron_step(runtime, clip):
    """megatron's bf16 optimizer stepping through the fused kernel (grad clip folded in, model copy in the same
    pass) == its own path (clip pass, torch AdamW, main->model copy) on one step from the same state, and == a
    float64 AdamW on every step of three."""
    if _te_importable():
        pytest.skip("the fused kernels replace megatron-core's fallbacks for machines without TE / apex")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from bridge_convert.provider import GPTModelProvider
    from bridge_train.optim import use_fused_optimizer_kernels

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
