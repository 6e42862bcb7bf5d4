"""Dotted overrides and --config merging: type conversion, unknown keys, bad values, atomicity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from config_stubs import FakeDoRA, FakeLoRA, MockDataConfig
from megatron.core.transformer.enums import AttnBackend

from bridge_train.config import (
    ConfigError,
    OptimizerConfig,
    TrainConfig,
    apply_cli_args,
    apply_overrides,
    parse_cli_args,
    peft_method_names,
    register_peft_method,
)


def test_issue_example_overrides_apply_with_types(make_cfg):
    cfg = make_cfg()
    apply_overrides(cfg, ["train.train_iters=10", "model.tensor_model_parallel_size=2", "optimizer.lr=3e-4",
                          "model.params_dtype=bfloat16", "scheduler.lr_decay_style=cosine",
                          "++logger.wandb_project=x"])
    assert cfg.train.train_iters == 10 and cfg.model.tensor_model_parallel_size == 2
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.params_dtype is torch.bfloat16
    assert cfg.scheduler.lr_decay_style == "cosine" and cfg.logger.wandb_project == "x"


OVERRIDES = [
    ("int", "train.micro_batch_size=4", lambda c: c.train.micro_batch_size, 4),
    ("float_from_int", "optimizer.weight_decay=0", lambda c: c.optimizer.weight_decay, 0.0),
    ("float_inf", "optimizer.grad_norm_skip_threshold=inf", lambda c: c.optimizer.grad_norm_skip_threshold,
     float("inf")),
    ("bool", "train.manual_gc=true", lambda c: c.train.manual_gc, True),
    ("str", "checkpoint.save=/tmp/ckpt", lambda c: c.checkpoint.save, "/tmp/ckpt"),
    ("str_quoted_number", "checkpoint.save='123'", lambda c: c.checkpoint.save, "123"),
    # YAML 1.1 reads these as numbers (8, 1000, 1000.0, 16, 1.1): a text field takes the text, as in Hydra
    ("str_octal_looking", "checkpoint.save=010", lambda c: c.checkpoint.save, "010"),
    ("str_underscored", "logger.wandb_exp_name=2024_01", lambda c: c.logger.wandb_exp_name, "2024_01"),
    ("str_exponent", "logger.wandb_exp_name=1e3", lambda c: c.logger.wandb_exp_name, "1e3"),
    ("str_hex_looking", "checkpoint.save=0x10", lambda c: c.checkpoint.save, "0x10"),
    ("str_trailing_zero", "checkpoint.save=1.10", lambda c: c.checkpoint.save, "1.10"),
    ("int_underscored", "train.train_iters=1_000", lambda c: c.train.train_iters, 1000),
    ("optional_null", "train.global_batch_size=null", lambda c: c.train.global_batch_size, None),
    ("literal", "robustness.nan_policy=skip", lambda c: c.robustness.nan_policy, "skip"),
    ("literal_int", "train.empty_unused_memory_level=2", lambda c: c.train.empty_unused_memory_level, 2),
    ("tuple", "profiling.profile_ranks=[0,3]", lambda c: c.profiling.profile_ranks, (0, 3)),
    ("tuple_of_str", "robustness.exit_signals=[SIGTERM]", lambda c: c.robustness.exit_signals, ("SIGTERM",)),
    ("dtype_alias", "model.pipeline_dtype=fp16", lambda c: c.model.pipeline_dtype, torch.float16),
    ("enum", "model.attention_backend=flash", lambda c: c.model.attention_backend, AttnBackend.flash),
    ("callable", "model.activation_func=torch.nn.functional.gelu", lambda c: c.model.activation_func, F.gelu),
    ("dict_merges", "model.generation_config.top_k=5", lambda c: c.model.generation_config,
     {"top_p": 0.9, "top_k": 5}),
    ("double_plus", "++rng.seed=7", lambda c: c.rng.seed, 7),
    ("interpolation", "train.eval_interval=${train.train_iters}", lambda c: c.train.eval_interval, 10),
    ("precision_name", "mixed_precision=bf16-mixed", lambda c: c.mixed_precision, "bf16-mixed"),
]


@pytest.mark.parametrize(("override", "read", "expected"), [c[1:] for c in OVERRIDES],
                         ids=[c[0] for c in OVERRIDES])
def test_override_converts_to_field_type(make_cfg, override, read, expected):
    cfg = make_cfg()
    cfg.model.generation_config = {"top_p": 0.9}
    apply_overrides(cfg, [override])
    value = read(cfg)
    assert value == expected and type(value) is type(expected)


def test_override_edits_named_precision_recipe(make_cfg):
    cfg = make_cfg()
    apply_overrides(cfg, ["mixed_precision=bf16_with_fp8_current_scaling_mixed",
                          "mixed_precision.num_layers_at_end_in_bf16=2"])
    assert cfg.mixed_precision.name == "bf16_with_fp8_current_scaling_mixed"
    assert cfg.mixed_precision.fp8 == "hybrid" and cfg.mixed_precision.num_layers_at_end_in_bf16 == 2


@pytest.mark.parametrize("order", ["recipe first", "recipe last"])
def test_a_precision_field_the_recipe_would_undo_is_refused(make_cfg, order):
    """finalize() applied the recipe over these overrides, silently (a logger.info line)."""
    cfg = make_cfg()
    overrides = ["model.pipeline_dtype=float32", "optimizer.initial_loss_scale=1024", "model.enable_autocast=true"]
    recipe = ["mixed_precision=bf16_mixed"]
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, recipe + overrides if order == "recipe first" else overrides + recipe)
    assert info.value.problems == [
        "model.pipeline_dtype (torch.float32) would be set back to torch.bfloat16 by mixed_precision 'bf16_mixed' at "
        "finalize(); set mixed_precision.pipeline_dtype to it instead, or mixed_precision=null to set the precision "
        "fields yourself (from override 'model.pipeline_dtype=float32')",
        "optimizer.initial_loss_scale (1024.0) would be set back to 4294967296.0 by mixed_precision 'bf16_mixed' at "
        "finalize(); set mixed_precision.initial_loss_scale to it instead, or mixed_precision=null to set the "
        "precision fields yourself (from override 'optimizer.initial_loss_scale=1024')",
        "model.enable_autocast (True) would be set back to False by mixed_precision 'bf16_mixed' at finalize(); set "
        "mixed_precision.autocast_enabled to it instead, or mixed_precision=null to set the precision fields "
        "yourself (from override 'model.enable_autocast=true')"]
    # the recipe's own values, and the recipe edited, are fine
    apply_overrides(cfg, recipe + ["model.pipeline_dtype=bf16", "mixed_precision.initial_loss_scale=1024"])
    cfg.finalize(world_size=1)
    assert cfg.model.pipeline_dtype is torch.bfloat16 and cfg.optimizer.initial_loss_scale == 1024


def test_a_precision_field_a_file_sets_that_the_recipe_would_undo_is_refused(make_cfg, tmp_path):
    """A --config file's model.params_dtype under a mixed_precision recipe was undone at finalize(), silently."""
    (tmp_path / "run.yaml").write_text("mixed_precision: bf16_mixed\nmodel:\n  params_dtype: float16\n")
    with pytest.raises(ConfigError) as info:
        apply_overrides(make_cfg(), config_files=[tmp_path / "run.yaml"])
    assert info.value.problems == [
        "model.params_dtype (torch.float16) would be set back to torch.bfloat16 by mixed_precision 'bf16_mixed' at "
        "finalize(); set mixed_precision.params_dtype to it instead, or mixed_precision=null to set the precision "
        f"fields yourself (from file {str(tmp_path / 'run.yaml')!r})"]
    cfg = make_cfg()  # a finalized config's own YAML (its precision fields as the recipe set them) applies
    apply_overrides(cfg, ["mixed_precision=bf16_mixed"])
    cfg.finalize(world_size=1)
    cfg.to_yaml(tmp_path / "finalized.yaml")
    fresh = apply_overrides(make_cfg(), config_files=[tmp_path / "finalized.yaml"]).finalize(world_size=1)
    assert fresh.model.params_dtype is torch.bfloat16 and fresh.optimizer.bf16


BAD = [
    ("unknown_key_sibling", "train.trian_iters=5",
     "unknown key 'train.trian_iters'; did you mean 'train.train_iters'? (from override 'train.trian_iters=5')"),
    ("unknown_key_other_section", "train.lr=3e-4", "unknown key 'train.lr'; did you mean 'optimizer.lr'?"),
    ("unknown_model_key", "model.num_layrs=3", "unknown key 'model.num_layrs'; did you mean 'model.num_layers'?"),
    ("unknown_section", "optimiser.lr=1", "unknown key 'optimiser'; did you mean 'optimizer'?"),
    # other trainers' names: these suggested eval_iters, lion_beta1, mamba_num_heads, tp_comm_overlap, dataset.seed
    ("alias_iters", "train.iters=5", "unknown key 'train.iters'; did you mean 'train.train_iters'?"),
    ("alias_beta1", "optimizer.beta1=0.8", "unknown key 'optimizer.beta1'; did you mean 'optimizer.adam_beta1'?"),
    ("alias_num_heads", "model.num_heads=8",
     "unknown key 'model.num_heads'; did you mean 'model.num_attention_heads'?"),
    ("alias_tp", "model.tp=2", "unknown key 'model.tp'; did you mean 'model.tensor_model_parallel_size'?"),
    ("alias_seed", "train.seed=3", "unknown key 'train.seed'; did you mean 'rng.seed'?"),
    ("alias_save_dir", "checkpoint.save_dir=/x", "unknown key 'checkpoint.save_dir'; did you mean 'checkpoint.save'?"),
    ("bad_int", "train.train_iters=ten",
     "train.train_iters: cannot use 'ten': expected int, got 'ten' (str) (from override 'train.train_iters=ten')"),
    ("bad_float", "optimizer.lr=fast", "optimizer.lr: cannot use 'fast': expected float | null"),
    ("bad_bool", "train.manual_gc=perhaps", "train.manual_gc: cannot use 'perhaps': expected bool, got 'perhaps' (str)"),
    ("bad_literal", "scheduler.lr_decay_style=cosin",
     "scheduler.lr_decay_style: cannot use 'cosin': expected one of 'constant', 'linear', 'cosine'"),
    ("bad_dtype", "model.params_dtype=bfloat17",
     "model.params_dtype: cannot use 'bfloat17': unsupported dtype 'bfloat17'; use one of float32, bfloat16, float16"),
    ("bad_callable", "model.activation_func=torch.nn.functional.nope",
     "model.activation_func: cannot use 'torch.nn.functional.nope'"),
    ("null_for_required", "train.train_iters=null", "train.train_iters: cannot use None: expected int, got null"),
    ("scalar_for_section", "model=3", "model: cannot use 3: expected a mapping for GPTModelProvider"),
    ("scalar_for_tuple", "profiling.profile_ranks=0", "write a list as [a, b]"),
    ("not_key_value", "train.train_iters", "override 'train.train_iters' must look like key=value"),
    ("plus_on_a_field", "+logger.wandb_project=x",
     "+logger.wandb_project: logger.wandb_project already exists (config fields always do); write "
     "logger.wandb_project=... to set it, or ++logger.wandb_project=... to set it whether or not it exists"),
    ("plus_on_an_existing_entry", "+model.generation_config.top_p=0.5",
     "model.generation_config.top_p already exists"),
    ("reset_required_field", "~train.train_iters",
     "~train.train_iters: train.train_iters is required and has no default to reset to; set it instead"),
    ("reset_unless_value_matches", "~train.micro_batch_size=3",
     "~train.micro_batch_size=3: train.micro_batch_size is 2, not 3; nothing was removed"),
    ("reset_section_unless_equal", "~model=3", "~model=3: model is a GPTModelProvider, not 3; nothing was removed"),
    ("remove_missing_entry", "~model.generation_config.top_k", "model.generation_config.top_k does not exist"),
    ("reset_unknown_key", "~train.eval_intervall", "unknown key 'train.eval_intervall'; did you mean "
     "'train.eval_interval'?"),
    ("entry_of_a_scalar", "+train.train_iters.x=1", "train.train_iters is 10, which has no entries to add or remove"),
    ("learning_rate_means_lr", "optimizer.learning_rate=1e-4",
     "unknown key 'optimizer.learning_rate'; did you mean 'optimizer.lr'?"),
    ("megatron_bridge_max_lr", "scheduler.max_lr=1e-4", "unknown key 'scheduler.max_lr'; did you mean 'optimizer.lr'?"),
    ("abbreviation", "train.mbs=4", "unknown key 'train.mbs'; did you mean 'train.micro_batch_size'?"),
    ("unknown_recipe", "mixed_precision=bf16_mixd",
     "mixed_precision: unknown mixed precision recipe 'bf16_mixd'; did you mean 'bf16_mixed'?"),
    ("unknown_peft_method", "peft=lorra", "peft: unknown PEFT method 'lorra'; did you mean 'lora'?"),
    ("bad_key", "train..x=1", "'train..x' is not a dotted key"),
    ("missing_interpolation", "train.eval_interval=${train.nope}",
     "cannot resolve an interpolation: Interpolation key 'train.nope' not found"),
    ("unclosed_list", "profiling.profile_ranks=[0, 1",
     "override 'profiling.profile_ranks=[0, 1': '[0, 1' is not valid YAML (while parsing a flow sequence, did "
     "not find expected ',' or ']'); close the brackets"),
]


@pytest.mark.parametrize(("override", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_override_is_rejected_naming_key_value_and_type(make_cfg, lora_registered, override, expected):
    cfg = make_cfg()
    cfg.model.generation_config = {"top_p": 0.9}
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, [override])
    assert any(expected in p for p in info.value.problems), info.value


def test_prefixes_add_set_and_reset_as_in_hydra(make_cfg):
    cfg = make_cfg(peft=FakeLoRA(dim=4), mixed_precision="bf16_mixed")
    cfg.model.generation_config = {"top_p": 0.9, "eos": {"id": 2}}
    cfg.train.eval_interval = 5
    cfg.optimizer.weight_decay = 0.3
    apply_overrides(cfg, ["+model.generation_config.top_k=5", "++model.generation_config.top_p=0.5",
                          "++train.micro_batch_size=4", "~model.generation_config.eos", "~train.eval_interval",
                          "~optimizer", "~mixed_precision=bf16_mixed", "~peft"])
    assert cfg.model.generation_config == {"top_p": 0.5, "top_k": 5}
    assert cfg.train.micro_batch_size == 4 and cfg.train.eval_interval is None
    assert cfg.optimizer == OptimizerConfig() and cfg.mixed_precision is None and cfg.peft is None


def test_peft_by_registered_name_then_edited(make_cfg, lora_registered):
    cfg = make_cfg()
    apply_overrides(cfg, ["peft=lora", "peft.dim=16"])
    assert cfg.peft == FakeLoRA(dim=16)
    apply_overrides(cfg, ["peft=DoRA"])
    assert cfg.peft == FakeDoRA()
    # naming the method already set keeps its settings (a recipe's adapter sizes), another one replaces it
    cfg.peft = FakeLoRA(dim=3)
    apply_overrides(cfg, ["peft=lora"])
    assert cfg.peft == FakeLoRA(dim=3)
    with pytest.raises(ConfigError, match=r"unknown key 'peft.dims'; did you mean 'peft.dim'\?"):
        apply_overrides(cfg, ["peft.dims=4"])


def test_peft_name_without_any_registered_method_says_what_to_do(make_cfg, monkeypatch):
    from bridge_train.config import protocols

    monkeypatch.setattr(protocols, "_METHODS", {})
    with pytest.raises(ConfigError, match=r"peft: unknown PEFT method 'lora': none is registered \(`import "
                                          r"bridge_recipes` registers lora, dora and canonical_lora\)"):
        apply_overrides(make_cfg(), ["peft=lora"])


def test_peft_registry_checks_names(lora_registered):
    with pytest.raises(ValueError, match="must be lower-case"):
        register_peft_method("LoRA", FakeLoRA)
    register_peft_method("fake_lora_twice", FakeLoRA)
    register_peft_method("fake_lora_twice", FakeLoRA)  # the same factory again: a module imported twice
    with pytest.raises(ValueError, match="'fake_lora_twice' is already registered"):
        register_peft_method("fake_lora_twice", FakeDoRA)
    assert "fake_lora_twice" in peft_method_names()


def test_bad_overrides_are_all_reported_and_nothing_is_applied(make_cfg):
    cfg = make_cfg()
    before = copy.deepcopy(cfg)
    with pytest.raises(ConfigError) as info:
        apply_overrides(cfg, ["train.train_iters=99", "optimizer.lr=fast", "model.hidden_size=128",
                              "logger.log_intervall=5", "mixed_precision=bf16_mixed"])
    assert len(info.value.problems) == 2
    assert cfg == before


def test_config_file_then_overrides(make_cfg, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  train_iters: 50\n  eval_interval: 10\n"
                    f"dataset:\n  _target_: {MockDataConfig.__module__}.MockDataConfig\n  seq_length: 16\n"
                    "mixed_precision: bf16_mixed\n")
    cfg = make_cfg(dataset=None)
    apply_cli_args(cfg, ["--config", str(path), "train.train_iters=7", "scheduler.lr_warmup_iters=2"])
    assert cfg.train.train_iters == 7 and cfg.train.eval_interval == 10
    assert cfg.dataset == MockDataConfig(seq_length=16)
    assert cfg.mixed_precision == "bf16_mixed" and cfg.scheduler.lr_warmup_iters == 2


def test_config_file_errors_name_the_file(make_cfg, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  train_itres: 50\n")
    with pytest.raises(ConfigError, match=r"did you mean 'train.train_iters'\? \(from file '.*bad.yaml'\)"):
        apply_cli_args(make_cfg(), [f"--config={path}"])


def test_saved_yaml_merges_back_onto_config(make_cfg, tmp_path):
    source = make_cfg()
    source.train.train_iters = 123
    source.model.tensor_model_parallel_size = 2
    path = tmp_path / "saved.yaml"
    source.to_yaml(path)
    cfg = make_cfg()
    apply_overrides(cfg, config_files=[path])
    assert cfg == source


def test_parse_cli_args_splits_files_and_overrides():
    assert parse_cli_args(["--config", "a.yaml", "x.y=1", "--config=b.yaml"]) == (["a.yaml", "b.yaml"], ["x.y=1"])
    with pytest.raises(ConfigError, match="unknown option '--cfg'"):
        parse_cli_args(["--cfg", "a.yaml"])
    with pytest.raises(ConfigError, match="--config needs a YAML file"):
        parse_cli_args(["--config"])


def test_override_edits_dataclass_peft_without_touching_it_on_error(make_cfg):
    cfg = make_cfg(peft=FakeLoRA(dim=8))
    with pytest.raises(ConfigError):
        apply_overrides(cfg, ["peft.dim=16", "train.train_iters=many"])
    assert cfg.peft.dim == 8
    apply_overrides(cfg, ["peft.dim=16"])
    assert cfg.peft == FakeLoRA(dim=16)
    apply_overrides(cfg, ["peft=null"])
    assert cfg.peft is None


def test_configs_are_slotted_so_typos_raise(make_cfg):
    cfg = make_cfg()
    with pytest.raises(AttributeError):
        cfg.train.trian_iters = 5
    with pytest.raises(AttributeError):
        cfg.trian = TrainConfig(train_iters=1)
