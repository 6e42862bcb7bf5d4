"""Rules that relate sub-configs to each other.

Each function returns messages that name the dotted fields involved, their values and the fix.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bridge_convert.dtypes import dtype_name as _name

from .fields import at_least
from .mixed_precision import MixedPrecisionConfig, quantization_support_problems

__all__ = ["batch_problems", "data_parallel_size", "model_layout_problems", "optimizer_ddp_problems",
           "precision_problems", "row_multiple", "run_problems", "schedule_problems"]


def data_parallel_size(model: Any, world_size: int | None) -> int:
    """``world_size / (TP x PP x CP)``; 1 when the world size is not known yet."""
    if world_size is None:
        return 1
    return max(world_size // max(model.tensor_model_parallel_size * model.pipeline_model_parallel_size
                                  * model.context_parallel_size, 1), 1)


def model_layout_problems(model: Any, world_size: int | None) -> list[str]:
    """Shape and parallel layout of the model: heads, KV groups, layers, sequence length against TP/PP/VP/CP."""
    problems = at_least(model, "model", **dict.fromkeys((
        "num_layers", "hidden_size", "num_attention_heads", "seq_length", "tensor_model_parallel_size",
        "pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size",
        "virtual_pipeline_model_parallel_size"), 1))
    # None: derived (the KV groups are the heads, kv_channels hidden / heads, the FFN 4 x hidden)
    problems += at_least(model, "model", null_disables=False, **dict.fromkeys((
        "num_query_groups", "kv_channels", "ffn_hidden_size", "make_vocab_size_divisible_by"), 1))
    problems += at_least(model, "model", null_disables=False, init_method_std=0)
    problems += [f"model.{name} must be in [0, 1], got {getattr(model, name)}"
                 for name in ("hidden_dropout", "attention_dropout") if not 0 <= getattr(model, name) <= 1]
    if model.normalization not in ("RMSNorm", "LayerNorm"):
        problems.append(f"model.normalization must be 'RMSNorm' or 'LayerNorm', got {model.normalization!r}")
    if model.vocab_size is None or model.vocab_size < 1:
        problems.append(f"model.vocab_size must be a positive integer, got {model.vocab_size!r}; set it from the "
                        "tokenizer (the bridge does this when importing an HF model)")
    if problems:
        return problems
    tp, pp, cp = model.tensor_model_parallel_size, model.pipeline_model_parallel_size, model.context_parallel_size
    vp = model.virtual_pipeline_model_parallel_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    if heads % tp:
        problems.append(f"model.num_attention_heads ({heads}) must be divisible by model.tensor_model_parallel_size "
                        f"({tp}); choose a TP that divides it ({_divisors(heads)})")
    if groups % tp:
        problems.append(f"model.num_query_groups ({groups}) must be divisible by model.tensor_model_parallel_size "
                        f"({tp}) so each TP rank holds whole KV groups; choose a TP in {_divisors(groups)}")
    if heads % groups:
        problems.append(f"model.num_attention_heads ({heads}) must be a multiple of model.num_query_groups ({groups})")
    ffn = model.ffn_hidden_size
    if isinstance(ffn, int) and ffn % tp:
        problems.append(f"model.ffn_hidden_size ({ffn}) must be divisible by model.tensor_model_parallel_size ({tp}); "
                        f"choose a TP in {_divisors(ffn)}")
    if model.kv_channels is None and model.hidden_size % heads:
        problems.append(f"model.hidden_size ({model.hidden_size}) must be divisible by model.num_attention_heads "
                        f"({heads}), or set model.kv_channels")
    if vp is not None and vp > 1 and pp == 1:
        problems.append(f"model.virtual_pipeline_model_parallel_size ({vp}) needs "
                        "model.pipeline_model_parallel_size > 1; set it to null")
    stages = pp * (vp or 1)
    if model.num_layers % stages and getattr(model, "pipeline_model_parallel_layout", None) is None:
        problems.append(f"model.num_layers ({model.num_layers}) must be divisible by "
                        f"model.pipeline_model_parallel_size x virtual_pipeline_model_parallel_size ({pp} x {vp or 1}"
                        f" = {stages}); choose PP x VP in {_divisors(model.num_layers)}")
    if cp > 1 and model.seq_length % (2 * cp):
        problems.append(f"model.seq_length ({model.seq_length}) must be divisible by 2 x "
                        f"model.context_parallel_size (2 x {cp} = {2 * cp}) for load-balanced context parallelism; "
                        f"set it to a multiple of {2 * cp}")
    if model.sequence_parallel and tp == 1:
        problems.append("model.sequence_parallel needs model.tensor_model_parallel_size > 1; set "
                        "model.sequence_parallel=false or raise TP")
    elif model.sequence_parallel and model.seq_length % (tp * cp):
        problems.append(f"model.seq_length ({model.seq_length}) must be divisible by model.tensor_model_parallel_size"
                        f" x context_parallel_size ({tp} x {cp}) with sequence parallelism: each TP rank holds an "
                        f"equal slice of the sequence; set it to a multiple of {tp * cp}")
    experts, ep = model.num_moe_experts, model.expert_model_parallel_size
    if ep > 1 and (not experts or experts % ep):
        problems.append(f"model.expert_model_parallel_size ({ep}) must divide model.num_moe_experts ({experts})")
    if world_size is not None and world_size % (tp * pp * cp):
        problems.append(f"world size {world_size} must be divisible by model.tensor_model_parallel_size x "
                        f"pipeline_model_parallel_size x context_parallel_size ({tp} x {pp} x {cp} = "
                        f"{tp * pp * cp}); change the parallel sizes or the number of processes")
    return problems


def batch_problems(train: Any, model: Any, world_size: int | None) -> list[str]:
    """The global batch must split into whole micro-batches on every data-parallel rank."""
    dp = data_parallel_size(model, world_size)
    gbs, mbs = train.global_batch_size, train.micro_batch_size
    if mbs < 1:  # train.micro_batch_size's own rule
        return []
    unknown = "" if world_size is not None else " (data-parallel size 1: the world size is not known yet)"
    if gbs is not None and gbs % (mbs * dp):
        return [f"train.global_batch_size ({gbs}) must be divisible by train.micro_batch_size x data-parallel size "
                f"({mbs} x {dp}){unknown}; set it to a multiple of {mbs * dp}"]
    vp, pp = model.virtual_pipeline_model_parallel_size, model.pipeline_model_parallel_size
    if vp is None or vp < 2:
        return []
    # megatron-core's interleaved schedule runs micro-batches in groups of microbatch_group_size_per_vp_stage
    # (default PP): at least PP of them, at most the micro-batches of a step.
    group = getattr(model, "microbatch_group_size_per_vp_stage", None) or pp
    micro_batches = (gbs or mbs * dp) // (mbs * dp)
    if group < pp:
        return [f"model.microbatch_group_size_per_vp_stage ({group}) must be >= model.pipeline_model_parallel_size "
                f"({pp}) for the interleaved (virtual-pipeline) schedule; set it to null (PP) or more"]
    if micro_batches < group:
        return [f"model.virtual_pipeline_model_parallel_size ({vp}) needs at least {group} micro-batches per step "
                f"(model.microbatch_group_size_per_vp_stage, default the PP size), train.global_batch_size "
                f"({gbs}) / (train.micro_batch_size x data-parallel size ({mbs} x {dp})){unknown} gives "
                f"{micro_batches}; set train.global_batch_size to a multiple of {mbs * dp} that is >= "
                f"{group * mbs * dp}"]
    return []


def precision_problems(model: Any, optimizer: Any, ddp: Any, mixed_precision: MixedPrecisionConfig | None) -> list[str]:
    """bf16/fp16/params dtype agree across model and optimizer; FP8/FP4 param gather agrees with DDP; FP8/FP4 can
    run here (Transformer Engine, GPU generation)."""
    fix = ("set mixed_precision (e.g. bf16_mixed), which sets model, optimizer and ddp together"
           if mixed_precision is None else f"do not edit the fields {mixed_precision.label} sets")
    problems = []
    if model.bf16 and model.fp16:
        problems.append("model.bf16 and model.fp16 are both true; pick one (" + fix + ")")
    model_bf16 = model.bf16 or model.params_dtype == torch.bfloat16
    model_fp16 = model.fp16 or model.params_dtype == torch.float16
    expected = torch.bfloat16 if model.bf16 else torch.float16 if model.fp16 else None
    if expected is not None and model.params_dtype != expected:
        problems.append(f"model.params_dtype ({_name(model.params_dtype)}) does not match model.bf16={model.bf16}, "
                        f"model.fp16={model.fp16}; set model.params_dtype={_name(expected)}, or {fix}")
    for flag, model_value in (("bf16", model_bf16), ("fp16", model_fp16)):
        if bool(getattr(optimizer, flag)) != model_value:
            problems.append(f"optimizer.{flag} ({getattr(optimizer, flag)}) does not match the model (bf16/fp16 from "
                            f"model.{flag}={getattr(model, flag)}, model.params_dtype={_name(model.params_dtype)}); "
                            f"{fix}, or set optimizer.{flag}={str(model_value).lower()}")
    if optimizer.params_dtype != model.params_dtype:
        problems.append(f"optimizer.params_dtype ({_name(optimizer.params_dtype)}) differs from model.params_dtype "
                        f"({_name(model.params_dtype)}); {fix}")
    if model.fp8 and model.fp4:
        problems.append(f"model.fp8 ({model.fp8!r}) and model.fp4 ({model.fp4!r}) are both set; choose one")
    for kind in ("fp8", "fp4"):
        if bool(getattr(model, f"{kind}_param")) != bool(getattr(ddp, f"{kind}_param_gather")):
            problems.append(f"model.{kind}_param ({getattr(model, f'{kind}_param')}) and ddp.{kind}_param_gather "
                            f"({getattr(ddp, f'{kind}_param_gather')}) must be equal; {fix}")
        if getattr(model, f"{kind}_param") and not getattr(model, kind):
            problems.append(f"model.{kind}_param needs model.{kind} to be set")
    if model.fp8 or model.fp4:
        source = mixed_precision.label if mixed_precision is not None else f"model.{'fp8' if model.fp8 else 'fp4'}"
        problems += quantization_support_problems(model.fp8, model.fp8_recipe, model.fp4, model.fp4_recipe, source)
        impl = getattr(model, "transformer_impl", "auto")
        if impl in ("native", "local"):
            problems.append(f"model.transformer_impl={impl!r} has no FP8/FP4 kernels; set "
                            "model.transformer_impl=transformer_engine (or auto)")
    return problems


def optimizer_ddp_problems(optimizer: Any, ddp: Any) -> list[str]:
    """The distributed optimizer and its parameter all-gather are set on both configs alike."""
    problems = []
    for name in ("use_distributed_optimizer", "overlap_param_gather"):
        if bool(getattr(optimizer, name)) != bool(getattr(ddp, name)):
            problems.append(f"optimizer.{name} ({getattr(optimizer, name)}) and ddp.{name} "
                            f"({getattr(ddp, name)}) must be equal; set both to the same value")
    return problems


def schedule_problems(scheduler: Any, optimizer: Any, train: Any) -> list[str]:
    """Warmup fits inside the decay, the schedule's learning rates fit optimizer.lr, weight decay grows."""
    problems = []
    decay = scheduler.lr_decay_iters or train.train_iters
    warmup = scheduler.lr_warmup_iters
    if scheduler.lr_warmup_fraction is not None and 0 <= scheduler.lr_warmup_fraction < 1:  # else: refused
        warmup = int(scheduler.lr_warmup_fraction * decay)
    if warmup >= decay:
        knob = ("scheduler.lr_warmup_fraction" if scheduler.lr_warmup_fraction is not None
                else f"scheduler.lr_warmup_iters, e.g. scheduler.lr_warmup_iters={decay // 10}")
        problems.append(f"scheduler.lr_warmup_iters ({warmup}) must be < the decay length ({decay}, "
                        f"scheduler.lr_decay_iters or train.train_iters); shorten the warmup ({knob})")
    if scheduler.lr_decay_style == "WSD" and scheduler.lr_wsd_decay_iters and scheduler.lr_wsd_decay_iters > decay:
        problems.append(f"scheduler.lr_wsd_decay_iters ({scheduler.lr_wsd_decay_iters}) must be <= the decay length "
                        f"({decay})")
    if optimizer.lr is not None and scheduler.lr_warmup_init > optimizer.lr:
        problems.append(f"scheduler.lr_warmup_init ({scheduler.lr_warmup_init}) must be <= optimizer.lr "
                        f"({optimizer.lr})")
    start = scheduler.start_weight_decay if scheduler.start_weight_decay is not None else optimizer.weight_decay
    end = scheduler.end_weight_decay if scheduler.end_weight_decay is not None else optimizer.weight_decay
    if end < start:
        problems.append(f"scheduler.end_weight_decay ({end}) must be >= scheduler.start_weight_decay ({start}) "
                        "(unset values default to optimizer.weight_decay)")
    elif scheduler.weight_decay_incr_style == "constant" and start != end:
        problems.append(f"scheduler.weight_decay_incr_style=constant but the weight decay goes from {start} to {end} "
                        "(unset values default to optimizer.weight_decay); choose linear or cosine")
    return problems


def row_multiple(model: Any) -> int:
    """What the length of every variable-length row (packed: every document) must be a multiple of for the model's
    layout: TP with sequence parallelism, 2 x CP with context parallelism (load-balanced halves)."""
    tp, cp = model.tensor_model_parallel_size, model.context_parallel_size
    return math.lcm(tp if model.sequence_parallel else 1, 2 * cp if cp > 1 else 1)


def _row_split(model: Any) -> str:
    parts = ([f"the {model.tensor_model_parallel_size} TP ranks of sequence parallelism"] if model.sequence_parallel
             else []) + ([f"2 x {model.context_parallel_size} context-parallel halves"]
                         if model.context_parallel_size > 1 else [])
    return " and ".join(parts)


def run_problems(cfg: Any, world_size: int | None) -> list[str]:
    """Dataset, PEFT, profiling and checkpoint settings against the rest of the run."""
    problems = []
    if cfg.dataset is None:
        problems.append("dataset is not set; assign a dataset config (e.g. bridge-data's mock, pretrain or SFT "
                        "config) to cfg.dataset")
    elif not callable(getattr(cfg.dataset, "build", None)):
        problems.append(f"dataset ({type(cfg.dataset).__name__}) has no build(tokenizer, ...) method; use a "
                        "bridge-data dataset config")
    else:
        paths = getattr(cfg.dataset, "paths", None)
        if getattr(cfg.dataset, "mock", False) is True and paths:
            problems.append(f"dataset.mock is true and dataset.paths is set ({list(paths)}): the config names real "
                            "data and random mock tokens at once; set dataset.mock=false to train on the paths, "
                            "or dataset.paths=[] for mock data")
        uses_eod = [k for k in ("eod_mask_loss", "reset_position_ids", "document_attention")
                    if getattr(cfg.dataset, k, False) is True]
        if uses_eod and paths and not getattr(cfg.dataset, "mock", False) and cfg.tokenizer is None:
            problems.append(f"dataset.{uses_eod[0]} finds documents by the eod token of the tokenizer that wrote "
                            "dataset.paths, but tokenizer is not set (a stand-in's eod would match nothing); set "
                            "tokenizer to that tokenizer (TokenizerConfig(path=...), bridge-run --tokenizer-path)")
        pad = getattr(cfg.dataset, "pad_to_multiple_of", None)
        need = row_multiple(cfg.model)
        if isinstance(pad, int) and pad >= 1 and pad % need:
            problems.append(f"dataset.pad_to_multiple_of ({pad}) must be a multiple of {need}: every row (packed: "
                            "every document in it) must split evenly over "
                            f"{_row_split(cfg.model)}; set dataset.pad_to_multiple_of={math.lcm(pad, need)}")
        data_seq = getattr(cfg.dataset, "seq_length", None)
        if isinstance(data_seq, int) and data_seq > cfg.model.seq_length:
            problems.append(f"dataset.seq_length ({data_seq}) exceeds model.seq_length ({cfg.model.seq_length}); "
                            "lower dataset.seq_length or raise model.seq_length")
    if getattr(cfg.model, "calculate_per_token_loss", False) and cfg.ddp.average_in_collective:
        problems.append("model.calculate_per_token_loss divides the gradients by the global token count itself, "
                        "so ddp.average_in_collective must be false (it would also divide by the data-parallel "
                        "size); set ddp.average_in_collective=false")
    if cfg.peft is not None and not callable(cfg.peft):
        problems.append(f"peft ({type(cfg.peft).__name__}) must be callable as peft(model, training) -> model")
    elif callable(getattr(cfg.peft, "validate", None)):  # its own settings (overrides set fields past __init__)
        try:
            cfg.peft.validate()
        except ValueError as exc:
            problems.append(f"peft: {exc}")
    prof = cfg.profiling
    if prof.use_pytorch_profiler:
        if prof.profile_dir is None and cfg.logger.tensorboard_dir is None:
            problems.append("profiling.use_pytorch_profiler needs profiling.profile_dir or logger.tensorboard_dir "
                            "for the trace")
        if prof.profile_step_start > cfg.train.train_iters:  # the end is exclusive: train_iters + 1 is the last
            problems.append(f"profiling.profile_step_start ({prof.profile_step_start}) is beyond train.train_iters "
                            f"({cfg.train.train_iters}); nothing would be profiled")
    if (prof.use_pytorch_profiler or prof.record_memory_history) and world_size is not None:
        outside = [r for r in prof.profile_ranks if r >= world_size]
        if outside:
            problems.append(f"profiling.profile_ranks {outside} do not exist in a world of {world_size} ranks")
    return problems


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if 0 < n <= 4096 else []
