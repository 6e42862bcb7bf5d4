"""What ``bridge-run RECIPE --dry-run`` prints: the run a validated config describes, without building it."""

from __future__ import annotations

from typing import Any

__all__ = ["describe", "parameter_count", "torchrun_command"]

GPUS_PER_NODE = 8
"""GPUs of one node in the launch commands bridge-run suggests (layouts of more processes span nodes)."""


def torchrun_command(processes: int, recipe: str) -> str:
    """The torchrun line for ``processes`` ranks: one node up to :data:`GPUS_PER_NODE`, else whole nodes."""
    if processes <= GPUS_PER_NODE or processes % GPUS_PER_NODE:
        return f"torchrun --nproc-per-node {processes} $(which bridge-run) {recipe} ..."
    nodes = processes // GPUS_PER_NODE
    return (f"torchrun --nnodes {nodes} --nproc-per-node {GPUS_PER_NODE} --rdzv-backend c10d --rdzv-endpoint "
            f"HOST:PORT $(which bridge-run) {recipe} ... (on each of the {nodes} nodes)")


def parameter_count(model: Any) -> int:
    """Parameters of a dense Llama-style provider (unpadded vocabulary; tied embeddings counted once)."""
    hidden, heads = model.hidden_size, model.num_attention_heads
    head_dim = model.kv_channels or hidden // heads
    groups = model.num_query_groups or heads
    attention = hidden * head_dim * (2 * heads + 2 * groups)
    mlp = hidden * model.ffn_hidden_size * (3 if model.gated_linear_unit else 2)
    embeddings = model.vocab_size * hidden * (1 if model.share_embeddings_and_output_weights else 2)
    return model.num_layers * (attention + mlp + 2 * hidden) + hidden + embeddings


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _weight_decay(opt: Any, sched: Any) -> str:
    """The weight decay applied: the scheduler's start -> end (finalize() derives them from optimizer.weight_decay
    when unset)."""
    start = opt.weight_decay if sched.start_weight_decay is None else sched.start_weight_decay
    end = opt.weight_decay if sched.end_weight_decay is None else sched.end_weight_decay
    return f"{start:g}" if start == end else f"{start:g} -> {end:g} ({sched.weight_decay_incr_style})"


def _data(cfg: Any) -> str:
    dataset = cfg.dataset
    name = type(dataset).__name__
    if name == "MockSFTDataConfig":
        return f"mock SFT conversations ({'packed' if dataset.packed else 'unpacked'}), seq {dataset.seq_length}"
    if name == "SFTDataConfig":
        return (f"SFT rows from {dataset.path} (schema {dataset.schema}, {'packed' if dataset.packed else 'unpacked'})"
                f", seq {dataset.seq_length}")
    if name == "PretrainDataConfig":
        return f"{'mock tokens' if not dataset.paths else ', '.join(dataset.paths)}, seq {dataset.seq_length}"
    return repr(dataset)


def _weights(recipe: Any, cfg: Any) -> str:
    if cfg.checkpoint.pretrained_checkpoint:
        return f"fine-tuned from {cfg.checkpoint.pretrained_checkpoint}"
    bridge = getattr(cfg.model, "_hf_bridge", None)
    if bridge is not None and bridge.hf_path is not None and cfg.model._pre_wrap_hooks:
        return f"loaded from {bridge.hf_path}"
    return "random initialisation" + (" (allow_random_init)" if recipe.is_finetune else "")


def describe(recipe: Any, cfg: Any, world_size: int, launched: bool) -> str:
    """A few aligned lines: recipe, model, weights, layout, batches, schedule, precision, data, PEFT, output."""
    model, train, opt, sched = cfg.model, cfg.train, cfg.optimizer, cfg.scheduler
    need = model.tensor_model_parallel_size * model.pipeline_model_parallel_size * model.context_parallel_size
    dp = world_size // need
    gbs = train.global_batch_size or train.micro_batch_size * dp
    layout = (f"TP {model.tensor_model_parallel_size}, PP {model.pipeline_model_parallel_size}, VP "
              f"{model.virtual_pipeline_model_parallel_size or '-'}, CP {model.context_parallel_size}, SP "
              f"{'on' if model.sequence_parallel else 'off'}: {need} process{'es' if need > 1 else ''} per replica")
    launch = (f"{world_size} processes (DP {dp})" if launched else
              f"needs a multiple of {need} processes: {torchrun_command(need, recipe.name)}" if need > 1
              else "1 process (plain python or torchrun)")
    precision = cfg.mixed_precision if isinstance(cfg.mixed_precision, str | None) else cfg.mixed_precision.name
    if cfg.checkpoint.save:
        when = (f"every {cfg.checkpoint.save_interval} iterations and at the end" if cfg.checkpoint.save_interval
                else "at the end (and on an exit signal)")
        saving = f"{when}, to {cfg.checkpoint.save}"
    else:
        saving = "none (set --dir or checkpoint.save)"
    rows = [
        ("recipe", f"{recipe.name}: {recipe.description}"),
        ("model", f"{model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads "
                  f"({model.num_query_groups or model.num_attention_heads} KV groups), FFN {model.ffn_hidden_size}, "
                  f"vocab {model.vocab_size}, {_billions(parameter_count(model))} parameters"),
        ("weights", _weights(recipe, cfg)),
        ("layout", layout),
        ("launch", launch),
        ("batch", f"global {gbs}, micro {train.micro_batch_size}, "
                  f"{gbs // (train.micro_batch_size * max(dp, 1))} micro-batches per step and DP rank"),
        ("schedule", f"{train.train_iters} iterations, lr {opt.lr:g} {sched.lr_decay_style} to {opt.min_lr or 0:g}, "
                     f"warmup {sched.lr_warmup_iters}; {opt.optimizer} betas ({opt.adam_beta1}, {opt.adam_beta2}), "
                     f"weight decay {_weight_decay(opt, sched)}, clip {opt.clip_grad}"),
        ("precision", str(precision)),
        ("data", _data(cfg)),
        ("peft", repr(cfg.peft) if cfg.peft is not None else "none (all parameters trained)"),
        ("checkpoints", saving),
        ("would run", f"{'finetune' if recipe.is_finetune else 'pretrain'}(cfg, gpt_forward_step)"),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
