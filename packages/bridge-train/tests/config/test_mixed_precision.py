"""Mixed-precision recipes: lookup by name, their fields and what apply() sets (Megatron-Bridge's published recipe
table), and the FP8/FP4 support checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from config_stubs import tiny_provider

from bridge_train.config import (
    MIXED_PRECISION_RECIPES,
    ConfigError,
    DDPConfig,
    MixedPrecisionConfig,
    OptimizerConfig,
    get_mixed_precision_config,
)
from bridge_train.config import mixed_precision as mp

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# recipe -> fields it must set (Megatron-Bridge's published recipe table)
EXPECTED = {
    "fp32": dict(bf16=False, fp16=False, params_dtype=FP32, fp8=None, fp4=None),
    "bf16_mixed": dict(bf16=True, fp16=False, params_dtype=BF16, pipeline_dtype=BF16, grad_reduce_in_fp32=True,
                       fp8=None, fp4=None),
    "fp16_mixed": dict(fp16=True, bf16=False, params_dtype=FP16, pipeline_dtype=FP16, grad_reduce_in_fp32=False,
                       loss_scale=None),
    "bf16_with_fp8_delayed_scaling_mixed": dict(bf16=True, fp8="hybrid", fp8_recipe="delayed",
                                                fp8_amax_history_len=1024, fp8_amax_compute_algo="max",
                                                fp8_param_gather=True),
    "fp16_with_fp8_delayed_scaling_mixed": dict(fp16=True, fp8="hybrid", fp8_recipe="delayed",
                                                fp8_amax_history_len=1024, fp8_param_gather=True),
    "bf16_with_fp8_current_scaling_mixed": dict(bf16=True, fp8="hybrid", fp8_recipe="tensorwise",
                                                first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                                                num_layers_at_end_in_bf16=1, fp8_param_gather=True),
    "fp16_with_fp8_current_scaling_mixed": dict(fp16=True, fp8="hybrid", fp8_recipe="tensorwise",
                                                first_last_layers_bf16=True),
    "bf16_with_fp8_subchannel_scaling_mixed": dict(bf16=True, fp8="hybrid", fp8_recipe="blockwise",
                                                   fp8_param_gather=False),
    "fp16_with_fp8_subchannel_scaling_mixed": dict(fp16=True, fp8="hybrid", fp8_recipe="blockwise",
                                                   fp8_param_gather=False),
    "bf16_with_mxfp8_mixed": dict(bf16=True, fp8="e4m3", fp8_recipe="mxfp8", fp8_param_gather=True,
                                  reuse_grad_buf_for_mxfp8_param_ag=True),
    "fp16_with_mxfp8_mixed": dict(fp16=True, fp8="e4m3", fp8_recipe="mxfp8", fp8_param_gather=True,
                                  reuse_grad_buf_for_mxfp8_param_ag=True),
    "bf16_with_nvfp4_mixed": dict(bf16=True, params_dtype=BF16, fp8=None, fp4="e2m1", fp4_recipe="nvfp4",
                                  fp4_param_gather=True),
}


def test_every_recipe_has_expected_fields():
    assert set(MIXED_PRECISION_RECIPES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_sets_reference_fields(name):
    recipe = get_mixed_precision_config(name)
    assert recipe.name == name
    for field_name, value in EXPECTED[name].items():
        assert getattr(recipe, field_name) == value, field_name
    assert recipe.check() == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_lookup_accepts_hyphen_spelling(name):
    assert get_mixed_precision_config(name.replace("_", "-")) == get_mixed_precision_config(name)


def test_recipe_lookup_returns_fresh_copies():
    first = get_mixed_precision_config("bf16_mixed")
    first.grad_reduce_in_fp32 = False
    assert get_mixed_precision_config("bf16_mixed").grad_reduce_in_fp32


def test_recipe_lookup_rejects_unknown_name_with_suggestion():
    with pytest.raises(ValueError, match=r"unknown mixed precision recipe 'bf16-mixd'; did you mean 'bf16_mixed'\?"):
        get_mixed_precision_config("bf16-mixd")
    # a start of several names (too short for a spelling match): the shortest
    with pytest.raises(ValueError, match=r"unknown mixed precision recipe 'bf16'; did you mean 'bf16_mixed'\?"):
        get_mixed_precision_config("bf16")
    with pytest.raises(ValueError, match=r"unknown mixed precision recipe 'int8'\. Known: fp32, "):
        get_mixed_precision_config("int8")


_BF16 = dict(bf16=True, fp16=False, params_dtype=BF16, pipeline_dtype=BF16)
_FP16 = dict(bf16=False, fp16=True, params_dtype=FP16, pipeline_dtype=FP16)
_NO_FP8 = dict(fp8=None, fp8_param=False, fp4=None, fp4_param=False)
_DELAYED = dict(fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=1024, fp8_amax_compute_algo="max",
                fp8_param=True, fp4=None)
_CURRENT = dict(fp8="hybrid", fp8_recipe="tensorwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                num_layers_at_end_in_bf16=1, fp8_param=True)
_BLOCKWISE = dict(fp8="hybrid", fp8_recipe="blockwise", fp8_param=False)
_MXFP8 = dict(fp8="e4m3", fp8_recipe="mxfp8", fp8_param=True)


def _opt(base, fp8_recipe=None, reuse=False):
    return dict(bf16=base["bf16"], fp16=base["fp16"], params_dtype=base["params_dtype"], fp8_recipe=fp8_recipe,
                reuse_grad_buf_for_mxfp8_param_ag=reuse, loss_scale=None, initial_loss_scale=2.0**32)


# recipe -> (model, optimizer, ddp) fields after apply(): megatron-core's names, values from Megatron-Bridge's
# published recipe table, written out rather than read back from the recipe objects
APPLIED = {
    "fp32": (dict(bf16=False, fp16=False, params_dtype=FP32, pipeline_dtype=FP32, **_NO_FP8),
             _opt(dict(bf16=False, fp16=False, params_dtype=FP32)), dict(fp8_param_gather=False)),
    "bf16_mixed": ({**_BF16, **_NO_FP8}, _opt(_BF16), dict(grad_reduce_in_fp32=True, fp8_param_gather=False)),
    "fp16_mixed": ({**_FP16, **_NO_FP8}, _opt(_FP16), dict(grad_reduce_in_fp32=False, fp8_param_gather=False)),
    "bf16_with_fp8_delayed_scaling_mixed": ({**_BF16, **_DELAYED}, _opt(_BF16, "delayed"),
                                            dict(grad_reduce_in_fp32=True, fp8_param_gather=True)),
    "fp16_with_fp8_delayed_scaling_mixed": ({**_FP16, **_DELAYED}, _opt(_FP16, "delayed"),
                                            dict(grad_reduce_in_fp32=False, fp8_param_gather=True)),
    "bf16_with_fp8_current_scaling_mixed": ({**_BF16, **_CURRENT}, _opt(_BF16, "tensorwise"),
                                            dict(fp8_param_gather=True)),
    "fp16_with_fp8_current_scaling_mixed": ({**_FP16, **_CURRENT}, _opt(_FP16, "tensorwise"),
                                            dict(fp8_param_gather=True)),
    "bf16_with_fp8_subchannel_scaling_mixed": ({**_BF16, **_BLOCKWISE}, _opt(_BF16, "blockwise"),
                                               dict(fp8_param_gather=False)),
    "fp16_with_fp8_subchannel_scaling_mixed": ({**_FP16, **_BLOCKWISE}, _opt(_FP16, "blockwise"),
                                               dict(fp8_param_gather=False)),
    "bf16_with_mxfp8_mixed": ({**_BF16, **_MXFP8}, _opt(_BF16, "mxfp8", reuse=True),
                              dict(fp8_param_gather=True, reuse_grad_buf_for_mxfp8_param_ag=True)),
    "fp16_with_mxfp8_mixed": ({**_FP16, **_MXFP8}, _opt(_FP16, "mxfp8", reuse=True),
                              dict(fp8_param_gather=True, reuse_grad_buf_for_mxfp8_param_ag=True)),
    "bf16_with_nvfp4_mixed": ({**_BF16, "fp8": None, "fp8_param": False, "fp4": "e2m1", "fp4_recipe": "nvfp4",
                               "fp4_param": True}, _opt(_BF16), dict(fp8_param_gather=False, fp4_param_gather=True)),
}


def test_every_recipe_has_applied_values():
    assert set(APPLIED) == set(MIXED_PRECISION_RECIPES)


@pytest.mark.parametrize("name", sorted(APPLIED))
def test_apply_sets_megatron_fields_to_published_values(name):
    model, optimizer, ddp = tiny_provider(), OptimizerConfig(lr=1e-4), DDPConfig()
    get_mixed_precision_config(name).apply(model, optimizer, ddp)
    for config, expected in zip((model, optimizer, ddp), APPLIED[name], strict=True):
        actual = {key: getattr(config, key) for key in expected}
        assert actual == expected, type(config).__name__


def test_apply_overwrites_previous_precision():
    model, optimizer, ddp = tiny_provider(), OptimizerConfig(lr=1e-4), DDPConfig()
    get_mixed_precision_config("bf16_with_fp8_delayed_scaling_mixed").apply(model, optimizer, ddp)
    get_mixed_precision_config("bf16_mixed").apply(model, optimizer, ddp)
    assert model.fp8 is None and not model.fp8_param and not ddp.fp8_param_gather and optimizer.fp8_recipe is None


INVALID = [
    ("bf16_and_fp16", dict(bf16=True, fp16=True, params_dtype=BF16), "bf16 and mixed_precision.fp16 are both true"),
    ("bf16_with_fp32_params", dict(bf16=True), "mixed_precision.params_dtype is float32 but bf16=True"),
    ("fp8_and_fp4", dict(bf16=True, params_dtype=BF16, fp8="hybrid", fp4="e2m1"), "FP8 and FP4 cannot be combined"),
    ("fp8_without_16bit_base", dict(fp8="hybrid"), "FP8/FP4 run on top of bf16 or fp16"),
    ("fp8_param_gather_without_fp8", dict(fp8_param_gather=True), "mixed_precision.fp8_param_gather needs"),
    ("mxfp8_gather_without_buffer_reuse",
     dict(bf16=True, params_dtype=BF16, fp8="e4m3", fp8_recipe="mxfp8", fp8_param_gather=True),
     "reuse_grad_buf_for_mxfp8_param_ag=true"),
    ("delayed_with_bf16_edges",
     dict(bf16=True, params_dtype=BF16, fp8="hybrid", fp8_recipe="delayed", first_last_layers_bf16=True),
     "delayed FP8 scaling cannot keep first/last layers in bf16"),
    ("bad_fp8_format", dict(fp8="e5m2"), "mixed_precision.fp8 must be one of 'e4m3', 'hybrid'"),
]


@pytest.mark.parametrize(("fields", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_check_rejects_inconsistent_recipe(fields, expected):
    problems = MixedPrecisionConfig(**fields).check()
    assert any(expected in p for p in problems), problems


@pytest.fixture
def no_te_no_gpu(monkeypatch):
    monkeypatch.setattr(mp, "transformer_engine_status",
                        lambda: (False, "ModuleNotFoundError: No module named 'transformer_engine'"))
    monkeypatch.setattr(mp, "gpu_capability", lambda: None)


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if "fp8" in n or "fp4" in n])
def test_quantized_recipe_without_te_or_gpu_says_what_is_missing(make_cfg, no_te_no_gpu, name):
    cfg = make_cfg(mixed_precision=name.replace("_", "-"))
    cfg.model.transformer_impl = "auto"
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    text = str(info.value)
    assert f"mixed_precision {name!r}" in text
    assert "needs Transformer Engine, which does not import here (ModuleNotFoundError" in text
    assert "install bridge-train[te]" in text
    assert "no CUDA GPU is visible (torch.cuda.is_available() is False)" in text
    assert "use mixed_precision=bf16_mixed" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks this machine's real detection on a CPU-only host")
def test_fp8_recipe_on_this_cpu_machine_is_rejected_before_any_build(make_cfg):
    cfg = make_cfg(mixed_precision="bf16_with_fp8_delayed_scaling_mixed")
    with pytest.raises(ConfigError, match=r"no CUDA GPU is visible") as info:
        cfg.validate()
    assert "compute capability >= 8.9" in str(info.value)
    assert not cfg.model.fp8, "validate() must not change the config"


@pytest.mark.parametrize(("recipe", "fp8", "fp4", "capability", "te_version", "expected"), [
    ("delayed", "hybrid", None, (9, 0), "2.8.0", None),
    ("tensorwise", "hybrid", None, (8, 9), "2.8.0", None),
    ("tensorwise", "hybrid", None, (8, 0), "2.8.0", "needs compute capability >= 8.9 (Ada/Hopper or newer); "
                                                    "this GPU has 8.0"),
    ("blockwise", "hybrid", None, (8, 9), "2.8.0", "needs compute capability >= 9.0 (Hopper or newer)"),
    ("mxfp8", "e4m3", None, (9, 0), "2.8.0", "needs compute capability >= 10.0 (Blackwell); this GPU has 9.0"),
    ("mxfp8", "e4m3", None, (10, 0), "2.8.0", None),
    ("nvfp4", None, "e2m1", (10, 0), "2.8.0", None),
    ("nvfp4", None, "e2m1", (10, 0), "2.5.1", "needs Transformer Engine >= 2.7, found 2.5.1"),
    ("nvfp4", None, "e2m1", (9, 0), "2.8.0", "needs compute capability >= 10.0 (Blackwell)"),
], ids=lambda v: str(v) if not isinstance(v, tuple) else ".".join(map(str, v)))
def test_support_check_compares_gpu_generation_and_te_version(monkeypatch, recipe, fp8, fp4, capability, te_version,
                                                              expected):
    monkeypatch.setattr(mp, "transformer_engine_status", lambda: (True, te_version))
    monkeypatch.setattr(mp, "gpu_capability", lambda: capability)
    problems = mp.quantization_support_problems(fp8, recipe if fp8 else None, fp4, recipe if fp4 else None, "test")
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_fp8_needs_transformer_engine_layer_spec(make_cfg, monkeypatch):
    monkeypatch.setattr(mp, "transformer_engine_status", lambda: (True, "2.8.0"))
    monkeypatch.setattr(mp, "gpu_capability", lambda: (9, 0))
    cfg = make_cfg(mixed_precision="bf16_with_fp8_current_scaling_mixed")
    cfg.model.transformer_impl = "native"
    with pytest.raises(ConfigError, match="model.transformer_impl='native' has no FP8/FP4 kernels"):
        cfg.validate()


def test_hand_made_fp8_on_model_is_checked_too(make_cfg, no_te_no_gpu):
    cfg = make_cfg(mixed_precision=dataclasses.replace(get_mixed_precision_config("bf16_mixed"), name=None))
    cfg.validate()
    cfg.mixed_precision = None
    cfg.model.fp8 = "hybrid"
    with pytest.raises(ConfigError, match=r"model.fp8 \(FP8 'delayed', Transformer Engine DelayedScaling\) needs"):
        cfg.validate()
