"""The native spec builds megatron-core's local layer tree: same parameter names, shapes and checkpoint keys."""

import pytest
import torch
from _native_models import build, provider

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


def test_compile_layers_compiles_each_layer(runtime):
    native = build("native", compile_layers=True)
    assert all(layer._compiled_call_impl is not None for layer in native.decoder.layers)
    assert all(layer._compiled_call_impl is None for layer in build("native").decoder.layers)


def test_auto_resolves_to_native_without_transformer_engine():
    assert resolve_transformer_impl("auto") == "native"


def test_spec_rejects_mixture_of_experts():
    config = provider("native", num_moe_experts=4)
    with pytest.raises(ValueError, match="dense models only"):
        get_native_layer_spec(config)


def test_norm_matches_torch_rms_norm():
    from bridge_convert.testing import tiny_transformer_config

    norm = NativeNorm(tiny_transformer_config(), hidden_size=64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    ref = torch.nn.RMSNorm(64, eps=1e-6)
    ref.weight.data.copy_(norm.weight.data)
    x = torch.randn(5, 3, 64)
    torch.testing.assert_close(norm(x), ref(x), rtol=0, atol=0)
