"""The native spec builds megatron-core's local layer tree: same parameter names, shapes and checkpoint keys."""

import pytest
import torch
from _native_models import TINY, build, copy_weights, grads, max_grad_diff, provider, randomise_norms

from bridge_convert.native import NativeDotProductAttention, NativeGPTModel, NativeNorm, get_native_layer_spec
from bridge_convert.specs import resolve_transformer_impl


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qk_layernorm": True, "kv_channels": 32}, {"share_embeddings_and_output_weights": True},
     {"add_qkv_bias": True}],
    ids=["llama", "qwen3-qk-norm", "tied-embeddings", "qwen2-qkv-bias"],
)
def test_parameter_names_match_local_spec(runtime, overrides):
    local, native = build("local", **overrides), build("native", **overrides)
    assert isinstance(native, NativeGPTModel)
    local_shapes = {n: tuple(p.shape) for n, p in local.named_parameters()}
    native_shapes = {n: tuple(p.shape) for n, p in native.named_parameters()}
    assert native_shapes == local_shapes
    layer = native.decoder.layers[0]
    assert isinstance(layer.self_attention.core_attention, NativeDotProductAttention)
    assert isinstance(layer.input_layernorm, NativeNorm)
    if overrides.get("qk_layernorm"):
        assert isinstance(layer.self_attention.q_layernorm, NativeNorm)


def test_sharded_state_dict_keys_match_local_spec(runtime):
    local, native = build("local"), build("native")
    assert sorted(native.sharded_state_dict().keys()) == sorted(local.sharded_state_dict().keys())
    assert native.decoder.layers[0].submodules_config.sharded_state_dict_keys_map == \
        local.decoder.layers[0].submodules_config.sharded_state_dict_keys_map


def test_compile_layers_compiles_each_layer(runtime, monkeypatch):
    """Each layer's forward runs as a torch.compile graph, and the compiled model computes what the eager one does
    (loss and every gradient). The backend is aot_eager (dynamo + AOTAutograd tracing, no inductor code generation)
    to keep the CPU test short; test_gpu.py runs inductor's CUDA kernels."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = build("native", seed=0), build("native", seed=1, compile_layers=True)
    assert all(layer._compiled_call_impl is not None for layer in compiled.decoder.layers)
    assert all(layer._compiled_call_impl is None for layer in eager.decoder.layers)
    randomise_norms(eager)
    copy_weights(eager, compiled)
    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(16).expand(2, 16)
    losses = []
    for model in (eager, compiled):
        loss = model(ids, pos, None, labels=ids)
        loss.float().mean().backward()
        losses.append(loss.detach())
    assert counters["stats"]["unique_graphs"] > 0 and counters["frames"]["ok"] > 0  # the compiled path ran
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    g_eager, g_compiled = grads(eager), grads(compiled)
    assert max_grad_diff(g_compiled, g_eager) < 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_compile_layers_is_refused_outside_the_native_spec(impl, monkeypatch):
    from bridge_convert import specs

    monkeypatch.setattr(specs, "te_available", lambda: True)  # let the TE spec resolve on any machine
    with pytest.raises(ValueError, match=f"compile_layers is a feature of the native spec; transformer_impl "
                                         f"resolved to '{impl}'"):
        provider(impl, compile_layers=True).finalize()


def test_auto_resolves_to_native_without_transformer_engine(monkeypatch):
    """Without an importable TE, ``auto`` is the native spec on any machine, with or without a GPU."""
    from bridge_convert import specs

    monkeypatch.setattr(specs, "transformer_engine_status", lambda: (False, "ImportError: no transformer_engine"))
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert resolve_transformer_impl("auto") == "native"
        with pytest.raises(ValueError, match="needs Transformer Engine and a CUDA GPU"):
            resolve_transformer_impl("transformer_engine")


def test_auto_resolves_to_transformer_engine_only_with_te_and_a_gpu(monkeypatch):
    from bridge_convert import specs

    monkeypatch.setattr(specs, "transformer_engine_status", lambda: (True, "2.8.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_transformer_impl("auto") == "transformer_engine"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_transformer_impl("auto") == "native"  # TE imports, but its spec needs a GPU


def test_spec_rejects_mixture_of_experts():
    config = provider("native", num_moe_experts=4)
    with pytest.raises(ValueError, match="dense models only"):
        get_native_layer_spec(config)


_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_norm_matches_torch_rms_norm(kind, device):
    """NativeNorm's output and gradients against a float64 reference written out here (on CUDA: liger's Triton
    RMSNorm when it imports). Rows of very different scales, the smallest with a mean square below eps, so a
    misplaced eps, a missing weight / bias or statistics over the wrong axis all show. fp32 tolerances: a few
    ulps of the outputs (~1e-7 relative), far below any of those errors (>= 1e-2)."""
    from bridge_convert.testing import tiny_transformer_config

    hidden, eps = 64, 1e-5
    norm = NativeNorm(tiny_transformer_config(normalization=kind), hidden_size=hidden, eps=eps).to(device)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=g))
        if norm.bias is not None:
            norm.bias.copy_(torch.randn(hidden, generator=g))
    scales = torch.tensor([1e-3, 1.0, 30.0]).repeat(4).view(4, 3, 1)
    x = (torch.randn(4, 3, hidden, generator=g) * scales + 0.5 * scales).to(device).requires_grad_()
    out = norm(x)
    upstream = torch.randn(out.shape, generator=g).to(device)
    out.backward(upstream)

    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    if kind == "RMSNorm":
        want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
        b64 = None
    else:
        b64 = norm.bias.detach().double().requires_grad_()
        centred = x64 - x64.mean(-1, keepdim=True)
        want = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * w64 + b64
    want.backward(upstream.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    if b64 is not None:
        torch.testing.assert_close(norm.bias.grad.double(), b64.grad, rtol=1e-4, atol=1e-4)
