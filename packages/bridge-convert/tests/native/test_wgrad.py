"""gradient_accumulation_fusion without apex: weight gradients accumulate straight into DDP's main_grad."""

import pytest
import torch
from _native_models import TINY
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.tensor_parallel import layers

from bridge_convert.native.wgrad import TorchWgradAccumulation, install_torch_wgrad_accumulation
from bridge_convert.provider import GPTModelProvider


@pytest.fixture
def restore_megatron_wgrad(monkeypatch):
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", layers._grad_accum_fusion_available)
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda",
                        getattr(layers, "fused_weight_gradient_mlp_cuda", None), raising=False)


def _main_grads(fusion: bool, impl: str) -> dict[str, torch.Tensor]:
    provider = GPTModelProvider(transformer_impl=impl, gradient_accumulation_fusion=fusion, **TINY)
    torch.manual_seed(0)
    (model,) = provider.provide_distributed_model(
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 32), generator=g)
    pos = torch.arange(32).expand(2, 32)
    model.zero_grad_buffer()
    for _ in range(2):  # two micro-batches: the second accumulates onto the first
        loss = model(ids, pos, None, labels=ids, loss_mask=torch.ones(2, 32))
        loss.sum().backward()
    return {name: p.main_grad.detach().clone() for name, p in model.module.named_parameters()}


@pytest.mark.parametrize("impl", ["native", "local"])
def test_fused_wgrad_accumulation_equals_ddp_hook_accumulation(runtime, restore_megatron_wgrad, impl):
    plain = _main_grads(False, impl)
    fused = _main_grads(True, impl)
    assert layers.fused_weight_gradient_mlp_cuda is TorchWgradAccumulation
    assert plain.keys() == fused.keys()
    linear = [k for k in plain if "linear" in k]
    assert linear, "the model has megatron linear layers"
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
        assert fused[name].abs().sum() > 0, name


def test_wgrad_accumulate_low_precision_operands_in_fp32(restore_megatron_wgrad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g).to(torch.bfloat16)
    dy = torch.randn(3, 5, 8, generator=g).to(torch.bfloat16)
    start = torch.randn(8, 16, generator=g)
    main_grad = start.clone()
    TorchWgradAccumulation.wgrad_gemm_accum_fp32(x, dy, main_grad)
    want = start.double() + dy.reshape(-1, 8).double().t() @ x.reshape(-1, 16).double()
    torch.testing.assert_close(main_grad.double(), want, rtol=1e-6, atol=1e-5)
    bf16_grad = start.to(torch.bfloat16)
    TorchWgradAccumulation.wgrad_gemm_accum_fp16(x, dy, bf16_grad)
    torch.testing.assert_close(bf16_grad.double(), want, rtol=2e-2, atol=5e-2)


def test_install_keeps_a_real_apex_extension(restore_megatron_wgrad):
    sentinel = object()
    layers.fused_weight_gradient_mlp_cuda, layers._grad_accum_fusion_available = sentinel, True
    assert install_torch_wgrad_accumulation() is False
    assert layers.fused_weight_gradient_mlp_cuda is sentinel
    layers._grad_accum_fusion_available = False
    assert install_torch_wgrad_accumulation() is True
    assert install_torch_wgrad_accumulation() is True  # idempotent
    assert layers.fused_weight_gradient_mlp_cuda is TorchWgradAccumulation
