"""GPTModelProvider: two-phase configuration, derived fields, errors before anything is built."""

import pytest
import torch

from bridge_convert.provider import GPTModelProvider, padded_vocab_size
from bridge_convert.specs import te_available


def _provider(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                vocab_size=100, seq_length=32)
    return GPTModelProvider(**{**base, **kw})


def test_fields_can_change_until_finalize():
    provider = _provider()
    provider.tensor_model_parallel_size = 2  # no validation yet
    provider.params_dtype = torch.bfloat16
    provider.finalize()
    assert provider.bf16 and provider.pipeline_dtype == torch.bfloat16 and provider.kv_channels == 16
    if not torch.cuda.is_available():
        assert provider.use_cpu_initialization and not provider.bias_activation_fusion


def test_replace_returns_an_unfinalized_copy():
    provider = _provider().finalize()
    other = provider.replace(num_layers=4)
    assert other.num_layers == 4 and provider.num_layers == 2
    other.tensor_model_parallel_size = 4  # still editable: validation runs at its own finalize()
    with pytest.raises(ValueError, match=r"num_query_groups \(2\) is not divisible"):
        other.finalize()


@pytest.mark.parametrize("vocab,divisible,tp,padded", [(100, 128, 1, 128), (128256, 128, 8, 129024), (128, 64, 2, 128)])
def test_padded_vocab_size(vocab, divisible, tp, padded):
    assert padded_vocab_size(vocab, divisible, tp) == padded


def test_problems_are_listed_together():
    with pytest.raises(ValueError) as err:
        _provider(vocab_size=None, num_layers=3, pipeline_model_parallel_size=2, transformer_impl="fast").finalize()
    text = str(err.value)
    assert "vocab_size must be a positive integer" in text and "num_layers (3)" in text
    assert "transformer_impl must be one of" in text


@pytest.mark.skipif(te_available(), reason="Transformer Engine is usable here")
def test_transformer_engine_impl_without_te_is_refused():
    with pytest.raises(ValueError, match="needs Transformer Engine and a CUDA GPU"):
        _provider(transformer_impl="transformer_engine").finalize()


@pytest.mark.skipif(te_available(), reason="Transformer Engine is usable here")
def test_output_discarding_recompute_without_te_is_refused():
    # megatron-core's CheckpointWithoutOutput calls TE's FP8 state manager unconditionally (a NameError without TE)
    with pytest.raises(ValueError, match=r"recompute_modules \['layernorm'\].*needs Transformer Engine"):
        _provider(transformer_impl="local", recompute_granularity="selective",
                  recompute_modules=["layernorm", "core_attn"]).finalize()
    _provider(recompute_granularity="selective", recompute_modules=["core_attn"]).finalize()
    # the native layer implements layernorm recompute itself (tests/native/test_recompute.py)
    _provider(transformer_impl="native", recompute_granularity="selective", recompute_modules=["layernorm"]).finalize()


def test_activation_fusion_default_drops_for_activations_without_a_kernel():
    provider = _provider(activation_func=torch.nn.functional.gelu, gated_linear_unit=False)
    provider.finalize()
    assert not provider.bias_activation_fusion  # megatron would refuse fused gelu without a bias
    assert _provider().bias_activation_fusion is True  # the field default, before finalize


def test_gradient_accumulation_fusion_resolves_off_without_ddp(runtime):
    provider = _provider()
    assert provider.gradient_accumulation_fusion is None
    provider.provide()
    assert provider.gradient_accumulation_fusion is False
