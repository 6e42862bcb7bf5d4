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


@pytest.mark.parametrize("impl,on_gpu,te,rope,loss,loss_impl", [
    ("transformer_engine", True, True, True, True, "te"),
    ("local", True, True, True, True, "te"),
    ("local", True, False, False, True, "native"),
    ("native", True, True, False, False, "te"),  # the native spec has its own fused RoPE and loss
    ("transformer_engine", False, True, False, False, "te"),
    ("local", False, False, False, False, "native"),
])
def test_fused_rope_and_loss_default_per_spec_and_machine(impl, on_gpu, te, rope, loss, loss_impl):
    provider = _provider(transformer_impl=impl)
    provider._resolve_fused_kernels(on_gpu=on_gpu, te=te)
    assert (provider.apply_rope_fusion, provider.cross_entropy_loss_fusion,
            provider.cross_entropy_fusion_impl) == (rope, loss, loss_impl)


def test_explicit_fusion_settings_are_kept_or_refused():
    provider = _provider(transformer_impl="transformer_engine", apply_rope_fusion=False,
                         cross_entropy_loss_fusion=False, cross_entropy_fusion_impl="native")
    provider._resolve_fused_kernels(on_gpu=True, te=True)
    assert (provider.apply_rope_fusion, provider.cross_entropy_loss_fusion,
            provider.cross_entropy_fusion_impl) == (False, False, "native")
    with pytest.raises(ValueError, match="apply_rope_fusion=True needs Transformer Engine"):
        _provider(transformer_impl="local", apply_rope_fusion=True)._resolve_fused_kernels(on_gpu=True, te=False)
    for loss_fusion in (True, None):  # explicit, or on by the auto default
        with pytest.raises(ValueError, match="cross_entropy_fusion_impl='te' needs Transformer Engine"):
            _provider(transformer_impl="local", cross_entropy_loss_fusion=loss_fusion,
                      cross_entropy_fusion_impl="te")._resolve_fused_kernels(on_gpu=True, te=False)


def test_fusions_resolve_off_when_finalized_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU resolution")
    provider = _provider(transformer_impl="local").finalize()
    assert provider.apply_rope_fusion is False and provider.cross_entropy_loss_fusion is False


@pytest.mark.parametrize(("pp", "vp", "overlap", "batch", "resolved"), [
    (2, None, None, None, (False, True)),   # no virtual pipeline: megatron-core's defaults
    (2, 2, None, None, (True, False)),      # interleaved: Megatron-LM's default, separate overlapped p2p ops
    (4, 2, None, True, (False, True)),      # batched p2p kept where the two neighbours differ
    (2, 2, False, False, (False, False)),   # explicit non-batched, non-overlapped
])
def test_pipeline_p2p_mode_resolves_per_schedule(pp, vp, overlap, batch, resolved):
    provider = _provider(num_layers=8, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
                         overlap_p2p_comm=overlap, batch_p2p_comm=batch)
    provider._resolve_p2p()
    assert (provider.overlap_p2p_comm, provider.batch_p2p_comm) == resolved


def test_batched_p2p_with_a_virtual_pipeline_over_two_stages_is_refused():
    with pytest.raises(ValueError, match="batch_p2p_comm=True with a virtual pipeline over"):
        _provider(num_layers=8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                  batch_p2p_comm=True)._resolve_p2p()


@pytest.mark.parametrize(("layout", "pp", "vp", "problem"), [
    ("Ett|ttL", 2, None, None),
    ("Et|t|t|tL", 2, None, None),  # 4 chunks over PP 2: VP 2, derived
    ("Et|t|t|tL", 2, 2, None),
    ("Et|ttL", 2, None, "places 3 decoder layers but num_layers is 4"),
    ("Ett|t|tL", 2, None, "does not fit pipeline_model_parallel_size 2"),
    ("Et|t|t|tL", 2, 4, "has 2 stage(s) per pipeline rank but virtual_pipeline_model_parallel_size is 4"),
    ("tt|ttL", 2, None, "The first layer must be embedding"),
    ("Ett|ttx", 2, None, "does not fit pipeline_model_parallel_size 2"),
])
def test_a_custom_pipeline_layout_is_checked_as_megatron_core_checks_it(layout, pp, vp, problem):
    """megatron-core's own TransformerConfig is the oracle of what is refused; the provider says it in words (a
    layout left over from a recipe after `model.num_layers=2` gave `Number of decoder layers 126must match ...`)."""
    from megatron.core.transformer import TransformerConfig

    settings = dict(num_layers=4, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
                    pipeline_model_parallel_layout=layout)
    try:
        TransformerConfig(hidden_size=64, num_attention_heads=4, pipeline_dtype=torch.float32, **settings)
        megatron_refuses = False
    except (AssertionError, ValueError):
        megatron_refuses = True
    assert megatron_refuses is (problem is not None)
    if problem is None:
        _provider(**settings).finalize()
    else:
        with pytest.raises(ValueError) as err:
            _provider(**settings).finalize()
        assert problem in str(err.value) and "set pipeline_model_parallel_layout to None" in str(err.value)
