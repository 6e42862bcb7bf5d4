"""to_yaml() / from_yaml(): round trips, what is skipped on save, and errors that name the key."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from config_stubs import FakeDoRA, FakeLoRA, MockDataConfig, TokenizerStub, tiny_provider

from bridge_convert.provider import GPTModelProvider
from bridge_train.config import (
    ConfigContainer,
    ConfigError,
    ConfigWarning,
    TrainConfig,
    get_mixed_precision_config,
)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """A custom activation, importable by path."""
    return F.relu(x) ** 2


@dataclass(kw_only=True)
class WideProvider(GPTModelProvider):
    """A provider subclass with an extra field: from_yaml must rebuild this class, not the base."""

    width_multiplier: float = 1.0
    """Extra field of the subclass."""


def _rich_cfg(make_cfg) -> ConfigContainer:
    model = WideProvider(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=128,
                         seq_length=32, params_dtype=torch.bfloat16, bf16=True, activation_func=squared_relu,
                         width_multiplier=2.0, generation_config={"top_p": 0.9, "eos": [1, 2]})
    cfg = make_cfg(model=model, tokenizer=TokenizerStub(vocab_size=128),
                   mixed_precision=get_mixed_precision_config("bf16_mixed"))
    cfg.optimizer.bf16 = True
    cfg.optimizer.params_dtype = torch.bfloat16
    cfg.scheduler.lr_decay_style = "WSD"
    cfg.scheduler.lr_wsd_decay_iters = 2
    cfg.profiling.profile_ranks = (0, 1)
    cfg.checkpoint.save = "/ckpt/${USER}"  # a literal "${" must survive (no interpolation)
    cfg.logger.tensorboard_dir = "/tb"
    return cfg


def test_yaml_round_trip_is_equal(make_cfg):
    cfg = _rich_cfg(make_cfg)
    text = cfg.to_yaml()
    back = ConfigContainer.from_yaml(text)
    assert back == cfg
    assert type(back.model) is WideProvider and back.model.width_multiplier == 2.0
    assert back.model.params_dtype is torch.bfloat16 and back.model.activation_func is squared_relu
    assert back.profiling.profile_ranks == (0, 1)
    assert back.checkpoint.save == "/ckpt/${USER}"
    assert back.optimizer.grad_norm_skip_threshold == math.inf
    assert type(back.dataset) is MockDataConfig and type(back.tokenizer) is TokenizerStub
    assert back.to_yaml() == text


def test_yaml_names_dtypes_callables_and_classes(make_cfg):
    text = _rich_cfg(make_cfg).to_yaml()
    assert "  params_dtype: bfloat16\n" in text
    assert f"  activation_func: {__name__}.squared_relu\n" in text
    assert f"  _target_: {__name__}.WideProvider\n" in text
    assert "  _target_: bridge_train.config.optimizer.OptimizerConfig\n" in text
    assert "attention_backend: auto\n" in text


def test_yaml_round_trip_through_file(make_cfg, tmp_path):
    cfg = make_cfg()
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    assert ConfigContainer.from_yaml(path) == cfg
    assert ConfigContainer.from_yaml(str(path)) == cfg


def test_finalized_config_round_trips_and_refinalizes(make_cfg):
    cfg = make_cfg(mixed_precision="bf16_mixed", train=TrainConfig(train_iters=10, micro_batch_size=2))
    cfg.finalize(world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # derived init methods (partials) are skipped silently
        text = cfg.to_yaml()
    assert "init_method:" not in text.replace("_init_method", "")
    back = ConfigContainer.from_yaml(text)
    assert back.model.init_method is None  # re-derived at finalize
    back.finalize(world_size=2)
    assert isinstance(back.model.init_method, functools.partial)
    assert back.to_yaml() == text


def test_a_finalized_pipeline_layout_is_saved_and_refinalizes(make_cfg):
    """finalize() parses the layout text into megatron-core's PipelineParallelLayerLayout, which had no YAML form:
    run_config.yaml lost it, and the loaded config failed its check (num_layers not divisible by PP)."""
    cfg = make_cfg(model=tiny_provider(num_layers=3, pipeline_model_parallel_size=2,
                                       pipeline_model_parallel_layout="Et|ttL"),
                   mixed_precision="bf16_mixed", train=TrainConfig(train_iters=10, micro_batch_size=2))
    cfg.finalize(world_size=2)
    assert type(cfg.model.pipeline_model_parallel_layout).__name__ == "PipelineParallelLayerLayout"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        text = cfg.to_yaml()
    assert "  pipeline_model_parallel_layout: Et|ttL\n" in text
    back = ConfigContainer.from_yaml(text)
    back.finalize(world_size=2)
    assert back.to_yaml() == text


@pytest.mark.parametrize("text", ["1e3", "1e-4", "5E+2", "1.5e3", "010", "0x1F", "true", "null", "1:30"])
def test_strings_that_look_like_numbers_round_trip(make_cfg, text):
    """PyYAML's float rule needs a dot and a signed exponent, OmegaConf's (the reader) does not: '1e3' was written
    unquoted and read back as 1000.0."""
    cfg = make_cfg()
    cfg.logger.wandb_exp_name = text
    assert ConfigContainer.from_yaml(cfg.to_yaml()).logger.wandb_exp_name == text


@pytest.mark.parametrize("finalized", [False, True])
def test_an_init_method_the_user_set_warns_that_it_is_not_saved(make_cfg, finalized):
    """Every init_method was skipped silently, as if finalize() had derived it: the reloaded config initialised
    the weights with another std and nothing said so."""
    cfg = make_cfg(train=TrainConfig(train_iters=10, micro_batch_size=2))
    cfg.model.init_method = functools.partial(torch.nn.init.normal_, mean=0.0, std=0.5)
    if finalized:
        cfg.finalize(world_size=1)
    with pytest.warns(ConfigWarning, match=r"model\.init_method = functools\.partial\(.*std=0\.5\)") as record:
        cfg.to_yaml()
    assert "output_layer_init_method" not in str(record[0].message)  # derived by finalize(): silently re-derived


def test_runtime_hooks_are_not_saved(make_cfg):
    cfg = make_cfg()
    cfg.model.no_sync_func = lambda: None
    cfg.model.grad_scale_func = lambda loss: loss
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        text = cfg.to_yaml()
    assert "no_sync_func" not in text and "grad_scale_func" not in text


def test_unserialisable_value_warns_naming_the_field(make_cfg):
    cfg = make_cfg()
    cfg.model.activation_func = lambda x: x
    with pytest.warns(ConfigWarning, match=r"model\.activation_func = <function"):
        text = cfg.to_yaml()
    assert "\n  activation_func:" not in text
    assert ConfigContainer.from_yaml(text).model.activation_func is F.silu  # the class default


def test_dataclass_peft_round_trips(make_cfg):
    cfg = make_cfg(peft=FakeLoRA(dim=16))
    text = cfg.to_yaml()
    assert "peft:\n  _target_: config_stubs.FakeLoRA\n  dim: 16\n" in text
    assert ConfigContainer.from_yaml(text).peft == FakeLoRA(dim=16)


class _OpaquePeft:
    """A PEFT method that is not a dataclass: code and state YAML cannot hold."""

    def __call__(self, model, training=True):
        return model

    def __repr__(self) -> str:
        return "OpaquePeft()"


def test_other_peft_is_saved_by_class_and_repr_only(make_cfg):
    cfg = make_cfg(peft=_OpaquePeft())
    with pytest.warns(ConfigWarning, match=r"peft \(only its class path and repr are saved\)"):
        text = cfg.to_yaml()
    assert f"peft:\n  _target_: {__name__}._OpaquePeft\n  _repr_: OpaquePeft()\n" in text
    with pytest.warns(ConfigWarning, match="peft .* is not restored; set cfg.peft in Python"):
        back = ConfigContainer.from_yaml(text)
    assert back.peft is None


def test_peft_by_registered_name_in_yaml(make_cfg, lora_registered):
    text = make_cfg().to_yaml().replace("peft: null", "peft: dora")
    assert ConfigContainer.from_yaml(text).peft == FakeDoRA()
    with pytest.raises(ConfigError, match="peft: unknown PEFT method 'lorax'; did you mean 'lora'"):
        ConfigContainer.from_yaml(text.replace("peft: dora", "peft: lorax"))


def test_from_yaml_resolves_interpolations(make_cfg):
    text = make_cfg().to_yaml().replace("  eval_interval: null", "  eval_interval: ${train.train_iters}")
    assert ConfigContainer.from_yaml(text).train.eval_interval == 10


def test_from_yaml_accepts_partial_sections(make_cfg):
    text = """
model:
  _target_: bridge_convert.provider.GPTModelProvider
  num_layers: 2
  vocab_size: 128
  params_dtype: bf16
train:
  train_iters: 5
dataset:
  _target_: config_stubs.MockDataConfig
mixed_precision: bf16-mixed
"""
    cfg = ConfigContainer.from_yaml(text)
    assert cfg.model.params_dtype is torch.bfloat16 and cfg.train.train_iters == 5
    assert cfg.optimizer.lr is None and cfg.mixed_precision == "bf16-mixed"
    assert cfg.model == tiny_provider(num_query_groups=None, ffn_hidden_size=None, hidden_size=64,
                                      num_attention_heads=1, seq_length=4096, params_dtype=torch.bfloat16)


BAD_YAML = [
    ("unknown_key", "train:\n  train_iters: 5\n  trian_iters: 3\nmodel: {num_layers: 2}\n",
     "unknown key 'train.trian_iters'; did you mean 'train.train_iters'?"),
    ("bad_value", "train:\n  train_iters: many\nmodel: {num_layers: 2}\n",
     "train.train_iters: cannot use 'many': expected int, got 'many' (str)"),
    ("bad_dtype", "train: {train_iters: 5}\nmodel: {params_dtype: bfloat17}\n",
     "model.params_dtype: cannot use 'bfloat17': unsupported dtype 'bfloat17'; use one of float32, bfloat16, float16"),
    ("missing_model", "train: {train_iters: 5}\n", "model is required"),
    ("missing_train_iters", "train: {}\nmodel: {num_layers: 2}\n", "train.train_iters is required (int) but missing"),
    ("key_in_the_wrong_section", "train: {train_iters: 5, lr: 1.0e-4}\nmodel: {}\n",
     "unknown key 'train.lr'; did you mean 'optimizer.lr'?"),
    ("key_from_another_framework", "train: {train_iters: 5}\nmodel: {}\noptimizer: {learning_rate: 1.0e-4}\n",
     "unknown key 'optimizer.learning_rate'; did you mean 'optimizer.lr'?"),
    ("unknown_section", "train: {train_iters: 5}\nmodel: {}\noptimiser: {lr: 1}\n",
     "unknown key 'optimiser'; did you mean 'optimizer'?"),
    ("wrong_target", "train: {train_iters: 5}\nmodel: {_target_: config_stubs.MockDataConfig}\n",
     "model._target_: 'config_stubs.MockDataConfig' is not a subclass of GPTModelProvider"),
    ("missing_target_class", "train: {train_iters: 5}\nmodel: {_target_: bridge_convert.provider.Nope}\n",
     "model._target_: cannot import 'bridge_convert.provider.Nope'"),
    ("dataset_without_target", "train: {train_iters: 5}\nmodel: {}\ndataset: {seq_length: 5}\n",
     "dataset: a mapping for DatasetConfigLike needs _target_"),
    ("not_yaml", "train: [unclosed\n", "YAML text is not valid YAML: while parsing a flow sequence, did not find "
     "expected ',' or ']' (line 2, column 1)"),
    ("list_document", "- 1\n- 2\n", "must be a mapping of sections"),
    ("missing_file", "does_not_exist.yaml", "config file 'does_not_exist.yaml' does not exist"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD_YAML], ids=[c[0] for c in BAD_YAML])
def test_from_yaml_rejects_bad_documents_naming_the_key(text, expected):
    with pytest.raises(ConfigError) as info:
        ConfigContainer.from_yaml(text)
    assert any(expected in p for p in info.value.problems), info.value
