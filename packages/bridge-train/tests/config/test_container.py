"""ConfigContainer.validate() / finalize(): every invariant names its field; finalize derives and is atomic."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from config_stubs import (
    FakeLoRA,
    IndexedDataStub,
    MockDataConfig,
    PaddedDataConfig,
    TokenizerStub,
    tiny_provider,
)

from bridge_train.config import ConfigError, ProfilingConfig, RobustnessConfig, TrainConfig, apply_overrides


def _set(**changes):
    """A mutation ``cfg -> None`` setting dotted attributes, e.g. ``_set(**{"model.sequence_parallel": True})``."""

    def mutate(cfg):
        for dotted, value in changes.items():
            *parents, name = dotted.split(".")
            obj = cfg
            for part in parents:
                obj = getattr(obj, part)
            setattr(obj, name, value)

    return mutate


# (id, mutation, world size, text the error must contain)
INVALID = [
    ("batch_not_divisible_by_micro_x_dp",
     _set(**{"train.global_batch_size": 10, "train.micro_batch_size": 4}), 2,
     "train.global_batch_size (10) must be divisible by train.micro_batch_size x data-parallel size (4 x 2); "
     "set it to a multiple of 8"),
    ("heads_not_divisible_by_tp", _set(**{"model.tensor_model_parallel_size": 3}), 3,
     "model.num_attention_heads (4) must be divisible by model.tensor_model_parallel_size (3)"),
    ("kv_groups_not_divisible_by_tp",
     _set(**{"model.num_attention_heads": 8, "model.tensor_model_parallel_size": 4}), 4,
     "model.num_query_groups (2) must be divisible by model.tensor_model_parallel_size (4)"),
    ("layers_not_divisible_by_pp_x_vp",
     _set(**{"model.pipeline_model_parallel_size": 2, "model.virtual_pipeline_model_parallel_size": 2}), 2,
     "model.num_layers (2) must be divisible by model.pipeline_model_parallel_size x "
     "virtual_pipeline_model_parallel_size (2 x 2 = 4)"),
    ("vp_with_fewer_micro_batches_than_pp",
     _set(**{"model.num_layers": 4, "model.pipeline_model_parallel_size": 2,
             "model.virtual_pipeline_model_parallel_size": 2, "train.global_batch_size": 1,
             "train.micro_batch_size": 1}), 2,
     "model.virtual_pipeline_model_parallel_size (2) needs at least 2 micro-batches per step"),
    ("vp_without_pp", _set(**{"model.virtual_pipeline_model_parallel_size": 2}), 1,
     "model.virtual_pipeline_model_parallel_size (2) needs model.pipeline_model_parallel_size > 1"),
    ("seq_not_divisible_by_2cp",
     _set(**{"model.context_parallel_size": 4, "model.seq_length": 36}), 4,
     "model.seq_length (36) must be divisible by 2 x model.context_parallel_size (2 x 4 = 8)"),
    ("sequence_parallel_without_tp", _set(**{"model.sequence_parallel": True}), 1,
     "model.sequence_parallel needs model.tensor_model_parallel_size > 1"),
    ("ffn_not_divisible_by_tp", _set(**{"model.ffn_hidden_size": 129, "model.tensor_model_parallel_size": 2}), 2,
     "model.ffn_hidden_size (129) must be divisible by model.tensor_model_parallel_size (2); choose a TP in "),
    ("sequence_parallel_seq_not_divisible_by_tp",
     _set(**{"model.tensor_model_parallel_size": 2, "model.sequence_parallel": True, "model.seq_length": 33}), 2,
     "model.seq_length (33) must be divisible by model.tensor_model_parallel_size x context_parallel_size (2 x 1) "
     "with sequence parallelism"),
    ("rows_not_padded_for_context_parallel",
     _set(**{"model.context_parallel_size": 2, "dataset": PaddedDataConfig(pad_to_multiple_of=2)}), 2,
     "dataset.pad_to_multiple_of (2) must be a multiple of 4: every row (packed: every document in it) must split "
     "evenly over 2 x 2 context-parallel halves; set dataset.pad_to_multiple_of=4"),
    ("rows_not_padded_for_sequence_parallel",
     _set(**{"model.tensor_model_parallel_size": 2, "model.sequence_parallel": True,
             "dataset": PaddedDataConfig(pad_to_multiple_of=1)}), 2,
     "dataset.pad_to_multiple_of (1) must be a multiple of 2"),
    ("world_not_divisible_by_model_parallel", _set(**{"model.tensor_model_parallel_size": 2}), 3,
     "world size 3 must be divisible by model.tensor_model_parallel_size x pipeline_model_parallel_size x "
     "context_parallel_size (2 x 1 x 1 = 2)"),
    ("vocab_missing", _set(**{"model.vocab_size": None}), 1, "model.vocab_size must be a positive integer"),
    ("distributed_optimizer_mismatch", _set(**{"optimizer.use_distributed_optimizer": True}), 1,
     "optimizer.use_distributed_optimizer (True) and ddp.use_distributed_optimizer (False) must be equal"),
    ("overlap_param_gather_without_distributed_optimizer", _set(**{"ddp.overlap_param_gather": True}), 1,
     "ddp.overlap_param_gather needs ddp.use_distributed_optimizer=true"),
    ("bf16_model_fp32_optimizer",
     _set(**{"model.bf16": True, "model.params_dtype": torch.bfloat16}), 1,
     "optimizer.bf16 (False) does not match the model"),
    ("bf16_flag_with_fp32_params", _set(**{"model.bf16": True, "optimizer.bf16": True}), 1,
     "model.params_dtype (float32) does not match model.bf16=True"),
    ("fp16_and_bf16", _set(**{"optimizer.fp16": True, "optimizer.bf16": True}), 1,
     "optimizer.fp16 and optimizer.bf16 are both true"),
    ("fp8_param_without_ddp_param_gather", _set(**{"model.fp8": "hybrid", "model.fp8_param": True}), 1,
     "model.fp8_param (True) and ddp.fp8_param_gather (False) must be equal"),
    ("eval_interval_without_eval_iters", _set(**{"train.eval_interval": 5, "train.eval_iters": 0}), 1,
     "train.eval_iters is 0 but train.eval_interval is 5"),
    ("zero_train_iters", _set(**{"train.train_iters": 0}), 1, "train.train_iters must be >= 1, got 0"),
    ("zero_micro_batch_size", _set(**{"train.micro_batch_size": 0}), 2, "train.micro_batch_size must be >= 1, got 0"),
    ("zero_tensor_parallel_size", _set(**{"model.tensor_model_parallel_size": 0}), 2,
     "model.tensor_model_parallel_size must be >= 1, got 0"),
    ("train_iters_as_text", _set(**{"train.train_iters": "10"}), 1,
     "train.train_iters must be int, got '10' (str)"),
    ("save_interval_without_save", _set(**{"checkpoint.save_interval": 5}), 1,
     "checkpoint.save_interval is set but checkpoint.save is not"),
    ("async_save_without_save", _set(**{"checkpoint.async_save": True}), 1,
     "checkpoint.async_save is true but checkpoint.save is not set"),
    ("finetune_without_weights", _set(**{"checkpoint.finetune": True}), 1,
     "checkpoint.finetune is true but neither checkpoint.pretrained_checkpoint nor checkpoint.load is set"),
    ("per_token_loss_averaged_in_collective", _set(**{"model.calculate_per_token_loss": True,
                                                      "ddp.average_in_collective": True}), 1,
     "so ddp.average_in_collective must be false"),
    ("lr_missing", _set(**{"optimizer.lr": None}), 1, "optimizer.lr is not set"),
    ("min_lr_above_lr", _set(**{"optimizer.min_lr": 1e-3}), 1, "optimizer.min_lr (0.001) must be <= optimizer.lr"),
    ("unknown_optimizer", _set(**{"optimizer.optimizer": "adamw"}), 1,
     "optimizer.optimizer must be one of ['adam', 'sgd'], got 'adamw'"),
    ("warmup_not_shorter_than_decay", _set(**{"scheduler.lr_warmup_iters": 10}), 1,
     "scheduler.lr_warmup_iters (10) must be < the decay length (10"),
    ("warmup_iters_and_fraction", _set(**{"scheduler.lr_warmup_iters": 2, "scheduler.lr_warmup_fraction": 0.1}), 1,
     "scheduler.lr_warmup_iters (2) and scheduler.lr_warmup_fraction (0.1) are both set"),
    ("wsd_without_decay_iters", _set(**{"scheduler.lr_decay_style": "WSD"}), 1,
     "scheduler.lr_decay_style=WSD needs scheduler.lr_wsd_decay_iters >= 1"),
    ("wsd_decay_iters_without_wsd", _set(**{"scheduler.lr_wsd_decay_iters": 5}), 1,
     "scheduler.lr_wsd_decay_iters=5 applies to lr_decay_style=WSD, not 'cosine'"),
    ("weight_decay_decreasing", _set(**{"scheduler.start_weight_decay": 0.1, "scheduler.end_weight_decay": 0.0}), 1,
     "scheduler.end_weight_decay (0.0) must be >= scheduler.start_weight_decay (0.1)"),
    ("dataset_missing", _set(dataset=None), 1, "dataset is not set"),
    ("dataset_longer_than_model", _set(dataset=MockDataConfig(seq_length=64)), 1,
     "dataset.seq_length (64) exceeds model.seq_length (32)"),
    ("eod_options_without_the_data_tokenizer",
     _set(dataset=IndexedDataStub(paths=["corpus"], eod_mask_loss=True), tokenizer=None), 1,
     "dataset.eod_mask_loss finds documents by the eod token of the tokenizer that wrote dataset.paths, but "
     "tokenizer is not set"),
    ("peft_not_callable", _set(peft=42), 1, "peft (int) must be callable"),
    ("peft_own_check", _set(peft=FakeLoRA(dim=0)), 1, "peft: FakeLoRA.dim must be > 0, got 0"),
    ("unknown_precision_recipe", _set(mixed_precision="bf17_mixed"), 1,
     "mixed_precision: unknown mixed precision recipe 'bf17_mixed'; did you mean 'bf16_mixed'?"),
    ("profiler_without_output_dir", _set(profiling=ProfilingConfig(use_pytorch_profiler=True, profile_step_end=5)), 1,
     "profiling.use_pytorch_profiler needs profiling.profile_dir or logger.tensorboard_dir"),
    # a start past the last iteration profiles nothing (an end past it stops at the end of the run: accepted)
    ("profiler_after_the_end",
     _set(profiling=ProfilingConfig(use_pytorch_profiler=True, profile_dir="/tmp/p", profile_step_start=11,
                                    profile_step_end=50)), 1,
     "profiling.profile_step_start (11) is beyond train.train_iters (10); nothing would be profiled"),
    ("profiler_from_iteration_0",
     _set(profiling=ProfilingConfig(use_pytorch_profiler=True, profile_dir="/tmp/p", profile_step_start=0)), 1,
     "profiling.profile_step_start (0) must be >= 1"),
    ("uncatchable_exit_signal", _set(robustness=RobustnessConfig(exit_signals=("SIGTERM", "SIGKILL"))), 1,
     "robustness.exit_signals names ['SIGKILL'], which no process can catch"),
    ("profile_rank_outside_world",
     _set(profiling=ProfilingConfig(use_pytorch_profiler=True, profile_dir="/tmp/p", profile_ranks=(0, 4))), 2,
     "profiling.profile_ranks [4] do not exist in a world of 2 ranks"),
    ("unknown_exit_signal", _set(**{"robustness.exit_signals": ("SIGTERM", "SIGNOPE")}), 1,
     "robustness.exit_signals has unknown signal names ['SIGNOPE']"),
    ("bad_nan_policy", _set(**{"robustness.nan_policy": "ignore"}), 1,
     "robustness.nan_policy must be one of 'stop', 'skip'"),
    ("tokenizer_finalize_error", _set(tokenizer=TokenizerStub(vocab_size=None)), 1,
     "tokenizer: Invalid TokenizerConfig: tokenizer_type='null' needs vocab_size"),
    ("megatron_transformer_config_error", _set(**{"model.fp8_output_proj": True}), 1,
     "model: fp8_output_proj must be used together with fp8 mode"),
    ("bad_world_size", _set(), 0, "world_size must be a positive integer, got 0"),
    # model values that passed and failed at build (a raw ZeroDivisionError / torch error), or trained silently
    ("zero_kv_groups", _set(**{"model.num_query_groups": 0}), 1, "model.num_query_groups must be >= 1, got 0"),
    ("zero_kv_channels", _set(**{"model.kv_channels": 0}), 1, "model.kv_channels must be >= 1, got 0"),
    ("zero_ffn", _set(**{"model.ffn_hidden_size": 0}), 1, "model.ffn_hidden_size must be >= 1, got 0"),
    ("zero_vocab_divisor", _set(**{"model.make_vocab_size_divisible_by": 0}), 1,
     "model.make_vocab_size_divisible_by must be >= 1, got 0"),
    ("negative_init_std", _set(**{"model.init_method_std": -1.0}), 1, "model.init_method_std must be >= 0, got -1.0"),
    ("dropout_above_one", _set(**{"model.hidden_dropout": 1.5}), 1, "model.hidden_dropout must be in [0, 1], got 1.5"),
    ("unknown_norm", _set(**{"model.normalization": "Bogus"}), 1,
     "model.normalization must be 'RMSNorm' or 'LayerNorm', got 'Bogus'"),
    # NaN passes every range check (comparisons are False), inf passes "> 0"
    ("nan_lr", _set(**{"optimizer.lr": math.nan}), 1, "optimizer.lr must be a finite number, got nan"),
    ("inf_lr", _set(**{"optimizer.lr": math.inf}), 1, "optimizer.lr must be a finite number, got inf"),
    ("nan_weight_decay", _set(**{"optimizer.weight_decay": math.nan}), 1,
     "optimizer.weight_decay must be a finite number, got nan"),
    ("inf_warmup_fraction", _set(**{"scheduler.lr_warmup_fraction": math.inf}), 1,  # was a raw OverflowError
     "scheduler.lr_warmup_fraction must be a finite number, got inf"),
    ("nan_dropout", _set(**{"model.attention_dropout": math.nan}), 1,
     "model.attention_dropout must be a finite number, got nan"),
]


@pytest.mark.parametrize(("mutate", "world_size", "expected"), [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
def test_validate_rejects_invalid_config_naming_the_field(make_cfg, mutate, world_size, expected):
    cfg = make_cfg()
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=world_size)
    assert any(expected in problem for problem in info.value.problems), info.value
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("world_size", "microbatches"), [(None, 4), (1, 4), (2, 2), (4, 1)])
def test_validate_accepts_valid_config(make_cfg, world_size, microbatches):
    cfg = make_cfg()  # global batch 8, micro batch 2
    before = copy.deepcopy(cfg)
    assert cfg.validate(world_size=world_size) is None
    assert cfg == before and not cfg.finalized, "validate() is a dry run"
    assert cfg.finalize(world_size=world_size) is cfg and cfg.finalized
    assert cfg.num_microbatches(world_size or 1) == microbatches  # 8 / (2 x DP)
    assert cfg.scheduler.lr_decay_iters == 10 and cfg.optimizer.min_lr == 0.0 and cfg.model.kv_channels == 16


def test_a_virtual_pipeline_with_enough_micro_batches_is_valid(make_cfg):
    cfg = make_cfg()  # global batch 8, micro batch 2: at world size 2 with PP=2, DP=1 and 4 micro-batches
    _set(**{"model.num_layers": 4, "model.pipeline_model_parallel_size": 2,
            "model.virtual_pipeline_model_parallel_size": 2})(cfg)
    cfg.validate(world_size=2)
    cfg.train.global_batch_size = 2  # 1 micro-batch of 2 < PP
    with pytest.raises(ConfigError, match="needs at least 2 micro-batches"):
        cfg.validate(world_size=2)


def test_python_assignment_of_wrong_type_is_reported_for_any_field(make_cfg):
    cfg = make_cfg()
    cfg.model.num_layers = "2"
    cfg.model.persist_layer_norm = "yes"  # a field no rule reads: still checked
    cfg.ddp.bucket_size = 1.5
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.problems == ["ddp.bucket_size must be int | None, got 1.5 (float)",
                                   "model.num_layers must be int, got '2' (str)",
                                   "model.persist_layer_norm must be bool, got 'yes' (str)"]


def test_a_bug_in_a_rule_is_raised_not_hidden(make_cfg, monkeypatch):
    from bridge_train.config import invariants

    def buggy(*args):
        return None + 1

    monkeypatch.setattr(invariants, "schedule_problems", buggy)
    with pytest.raises(TypeError, match="unsupported operand"):
        make_cfg().validate()


def test_validate_reports_every_problem_at_once(make_cfg):
    cfg = make_cfg()
    _set(**{"train.train_iters": 0, "model.sequence_parallel": True, "optimizer.lr": None,
            "checkpoint.save_interval": 3})(cfg)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    fields = ["train.train_iters", "model.sequence_parallel", "optimizer.lr", "checkpoint.save_interval"]
    for name in fields:
        assert any(name in p for p in info.value.problems), name
    assert f"({len(info.value.problems)} problems)" in str(info.value)


def test_validate_does_not_change_the_config(make_cfg):
    cfg = make_cfg(mixed_precision="bf16_mixed", train=TrainConfig(train_iters=10))
    cfg.validate(world_size=2)
    assert cfg.mixed_precision == "bf16_mixed"
    assert cfg.model.params_dtype == torch.float32 and not cfg.model.bf16
    assert cfg.train.global_batch_size is None
    assert cfg.scheduler.lr_decay_iters is None
    assert not cfg.finalized


def test_finalize_applies_precision_and_derives_fields(make_cfg):
    cfg = make_cfg(mixed_precision="bf16-mixed", train=TrainConfig(train_iters=20, micro_batch_size=2))
    cfg.scheduler.lr_warmup_fraction = 0.25
    model = cfg.model
    assert cfg.finalize(world_size=4) is cfg
    assert cfg.model is model, "finalize changes the provider in place (callers keep their reference)"
    assert cfg.mixed_precision.name == "bf16_mixed"
    assert model.bf16 and model.params_dtype == torch.bfloat16 and model.pipeline_dtype == torch.bfloat16
    assert cfg.optimizer.bf16 and cfg.optimizer.params_dtype == torch.bfloat16
    assert cfg.ddp.grad_reduce_in_fp32
    assert cfg.train.global_batch_size == 8  # micro 2 x DP 4
    assert cfg.num_microbatches(4) == 1
    assert cfg.scheduler.lr_decay_iters == 20 and cfg.scheduler.lr_warmup_iters == 5
    assert cfg.scheduler.lr_warmup_fraction is None
    assert cfg.scheduler.start_weight_decay == 0.01 == cfg.scheduler.end_weight_decay  # megatron-core's default
    assert cfg.optimizer.min_lr == 0.0
    assert model._finalized and model.kv_channels == 16  # the provider's own finalize ran
    assert hasattr(cfg.optimizer, "use_precision_aware_optimizer_no_fp8_or_ds_fp8")  # megatron-core's __post_init__
    assert cfg.finalized and cfg.finalize(world_size=4) is cfg


def test_finalize_leaves_config_unchanged_when_invalid(make_cfg):
    cfg = make_cfg(mixed_precision="bf16_mixed")
    cfg.model.tensor_model_parallel_size = 3
    with pytest.raises(ConfigError, match="model.num_attention_heads"):
        cfg.finalize(world_size=3)
    assert cfg.mixed_precision == "bf16_mixed" and not cfg.model.bf16 and not cfg.finalized


def test_num_microbatches_counts_gradient_accumulation(make_cfg):
    cfg = make_cfg()  # global 8, micro 2
    assert cfg.data_parallel_size(2) == 2
    assert cfg.num_microbatches(2) == 2
    cfg.model.tensor_model_parallel_size = 2
    assert cfg.data_parallel_size(2) == 1 and cfg.num_microbatches(2) == 4


def test_finalize_rejects_provider_finalized_before_precision(make_cfg):
    model = tiny_provider().finalize()
    cfg = make_cfg(model=model, mixed_precision="bf16_mixed")
    with pytest.raises(ConfigError, match="model was finalized before the container"):
        cfg.validate()


def test_overrides_after_finalize_are_rejected(make_cfg):
    cfg = make_cfg().finalize()
    with pytest.raises(ConfigError, match="apply overrides before finalize"):
        apply_overrides(cfg, ["train.train_iters=5"])


def test_scheduler_kwargs_are_accepted_by_megatron_scheduler(make_cfg):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg = make_cfg(train=TrainConfig(train_iters=100, micro_batch_size=2, global_batch_size=8))
    cfg.scheduler.lr_warmup_iters = 10
    cfg.optimizer.min_lr = 3e-5
    cfg.finalize()
    optimizer = types.SimpleNamespace(param_groups=[{"params": []}])
    scheduler = OptimizerParamScheduler(optimizer, **cfg.scheduler.param_scheduler_kwargs(cfg.optimizer, 100))
    scheduler.step(10)  # end of warmup: the peak learning rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)
    scheduler.step(90)  # end of the cosine decay: the floor
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-5)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(cfg.optimizer.weight_decay)


def test_scheduler_kwargs_need_finalized_config(make_cfg):
    cfg = make_cfg()
    with pytest.raises(ValueError, match="finalize"):
        cfg.scheduler.param_scheduler_kwargs(cfg.optimizer, 10)


def test_dry_run_copies_share_private_state_but_not_fields():
    from bridge_train.config.container import section_copy

    model = tiny_provider(generation_config={"top_p": 0.9})
    model._weights_hook = [lambda chunks: chunks]  # e.g. a pre-wrap hook closing over loaded weights
    clone = section_copy(model)
    assert clone is not model and clone == model
    assert clone._weights_hook is model._weights_hook
    assert clone.generation_config is not model.generation_config


def test_wandb_project_without_wandb_installed_is_rejected(make_cfg, monkeypatch):
    from bridge_train.config import logger as logger_module

    real_find_spec = logger_module.importlib.util.find_spec
    monkeypatch.setattr(logger_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    cfg = make_cfg()
    cfg.logger.wandb_project = "demo"
    with pytest.raises(ConfigError, match=r"logger.wandb_project is 'demo' but wandb is not installed"):
        cfg.validate()


def test_options_of_a_feature_that_is_off_are_refused(make_cfg):
    """W&B settings without a W&B project, resume settings without a directory to resume from, trace settings without
    the profiler: nothing reads them."""
    cfg = make_cfg()
    cfg.logger.wandb_entity, cfg.logger.wandb_save_dir = "team", "/tmp/wandb"
    cfg.checkpoint.fallback_to_previous = cfg.checkpoint.exit_on_missing_checkpoint = True
    cfg.profiling.record_shapes, cfg.profiling.memory_snapshot_path = True, "/tmp/snapshot.pickle"
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert sorted(info.value.problems) == [
        "checkpoint.exit_on_missing_checkpoint is true but checkpoint.load is not set",
        "checkpoint.fallback_to_previous is true but checkpoint.load is not set",
        "logger.wandb_entity is set but logger.wandb_project is not (no W&B run); set logger.wandb_project, or "
        "logger.wandb_entity=null",
        "logger.wandb_save_dir is set but logger.wandb_project is not (no W&B run); set logger.wandb_project, or "
        "logger.wandb_save_dir=null",
        "profiling.memory_snapshot_path is set but profiling.record_memory_history is false; set "
        "profiling.record_memory_history=true, or profiling.memory_snapshot_path=null",
        "profiling.record_shapes is set but profiling.use_pytorch_profiler is false; set "
        "profiling.use_pytorch_profiler=true, or profiling.record_shapes=false",
    ]
    cfg.profiling.use_pytorch_profiler = cfg.profiling.record_memory_history = True  # all read now
    cfg.profiling.profile_dir = "/tmp/traces"
    cfg.logger.wandb_entity = cfg.logger.wandb_save_dir = None
    cfg.checkpoint.fallback_to_previous = cfg.checkpoint.exit_on_missing_checkpoint = False
    cfg.validate()


def test_the_null_hint_is_given_only_where_null_disables_the_field(make_cfg):
    """``optimizer.lr=null`` is refused and ``scheduler.lr_decay_iters=null`` means train_iters: neither is offered
    as a way to disable; ``train.eval_interval=null`` does turn evaluation off."""
    cfg = make_cfg()
    cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.scheduler.lr_decay_iters, cfg.train.eval_interval = -1.0, 0.0, 0, 0
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=1)
    problems = info.value.problems
    assert "optimizer.lr must be > 0, got -1.0" in problems
    assert "scheduler.lr_decay_iters must be >= 1, got 0" in problems
    assert "train.eval_interval must be >= 1, got 0; set it to null to disable" in problems
