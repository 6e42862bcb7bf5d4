"""Everything a run needs, built in order: config check, tokenizer, runtime, datasets, model, optimizer,
scheduler, the resume from a checkpoint, and the data iterators.

The config is finalized (and so validated) before any process group or model exists, so a bad override fails in
a second with the field named; the datasets are built before the model, so bad data fails before a large
checkpoint is read.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge_convert.runtime import ParallelLayout, ParallelState, initialize_parallel

from .checkpoint_discovery import CheckpointError, MissingCheckpointError, save_dir_problem
from .checkpointing import (
    TrainState,
    adapter_only_checkpoints,
    check_optimizer_checkpointable,
    check_resumable,
    find_resume_checkpoint,
    load_training_checkpoint,
)
from .config import ConfigContainer

__all__ = ["TrainingDataExhaustedError", "TrainingRun", "build_run_tokenizer", "setup_run"]

logger = logging.getLogger("bridge")


@dataclass
class TrainingRun:
    """The built pieces of a run; the loop and the checkpointing read them from here."""

    cfg: ConfigContainer
    parallel: ParallelState
    model: list
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    bridge: Any
    """bridge_convert AutoBridge of the model (None when the provider names no HF architecture)."""
    train_state: TrainState
    train_iterator: Any = None
    valid_iterator: Any = None
    schedule_seq_length: int = 0
    schedule_micro_batch_size: int = 0
    resumed_from: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when setup began: ``train.exit_duration_in_mins`` counts from there (building the model
    and loading checkpoints included, as Megatron-LM counts them)."""


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def build_run_tokenizer(cfg: ConfigContainer):
    """The run's tokenizer (a null one of ``model.vocab_size`` ids without a tokenizer config); sets
    ``model.vocab_size`` from it when unset. Reads the tokenizer files only, so launchers call it for a dry run.

    Raises:
        ValueError: for a tokenizer with more ids than ``model.vocab_size``, or neither of them set.
    """
    from bridge_data import TokenizerConfig, build_tokenizer

    tok_cfg = cfg.tokenizer
    if tok_cfg is None:
        if cfg.model.vocab_size is None:
            raise ValueError("model.vocab_size is not set and there is no tokenizer config to take it from; set "
                             "tokenizer (e.g. TokenizerConfig(tokenizer_type='hf', path=...)) or model.vocab_size")
        tok_cfg = TokenizerConfig(tokenizer_type="null", vocab_size=cfg.model.vocab_size)
    tokenizer = build_tokenizer(tok_cfg)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}; token ids would fall outside the embedding")
    return tokenizer


def _pretrained_weights_hook(path: str):
    """Pre-wrap hook: load a Megatron checkpoint's or an HF checkpoint's weights into the fresh model chunks."""
    def load(chunks: list) -> list:
        from bridge_convert import AutoBridge
        from bridge_convert.megatron_ckpt import load_model_state

        if (Path(path) / "config.json").exists():
            AutoBridge.from_hf_pretrained(path).load_hf_weights(chunks)
        else:
            load_model_state(chunks, path, fresh_model=True)
        return chunks

    return load


def _peft_check_hook(peft):
    """Pre-wrap hook: the PEFT method's ``check_targets`` (a target that matches no layer fails before a large
    pretrained checkpoint is read, not after)."""

    def check(chunks: list) -> list:
        peft.check_targets(chunks)
        return chunks

    return check


def _peft_hook(peft):
    def apply(chunks: list) -> list:
        out = peft(chunks, training=True)
        return out if out is not None else chunks

    return apply


def _model_bridge(provider):
    from bridge_convert import AutoBridge

    if getattr(provider, "_hf_bridge", None) is None and not provider.hf_architecture:
        return None
    return AutoBridge.for_provider(provider)


def _dataset_sizes(cfg: ConfigContainer, saved: TrainState | None) -> tuple[int, int, int]:
    """Samples to build: (train, valid, test).

    A resumed run reads its samples after the saved run's (with another global batch size than the saved run's,
    not ``train_iters x global_batch_size``), from datasets at least as large as the saved run's: megatron-core's
    GPTDataset orders a dataset of fewer epochs differently, so a resume that stops earlier would read other
    samples than the saved run would have (one that goes on longer needs a larger dataset, ordered anew).
    """
    gbs = cfg.train.global_batch_size
    train = cfg.train.train_iters * gbs
    if saved is not None:
        needed = saved.consumed_train_samples + max(0, cfg.train.train_iters - saved.iteration) * gbs
        train = max(needed, saved.train_samples) if saved.train_samples else max(train, needed)
    if cfg.train.eval_interval:
        evals = cfg.train.train_iters // cfg.train.eval_interval + 1
        valid = max(evals * cfg.train.eval_iters * gbs, saved.valid_samples if saved is not None else 0)
        return train, valid, cfg.train.eval_iters * gbs
    return train, 0, 0


def _iterators(cfg: ConfigContainer, dataset, parallel: ParallelState, consumed: int, *, cycle: bool,
               chunks: int):
    """One resumable loader per model chunk (virtual pipeline stages each read the whole stream)."""
    from bridge_data import build_dataloader

    if dataset is None:
        return None
    loaders = [
        build_dataloader(dataset, micro_batch_size=cfg.train.micro_batch_size, dp_rank=parallel.dp_rank,
                         dp_size=parallel.dp_size, consumed_samples=consumed, cycle=cycle)
        for _ in range(chunks)
    ]
    iterators = [iter(loader) if cycle else _TrainingBatches(loader) for loader in loaders]
    return iterators if chunks > 1 else iterators[0]


class TrainingDataExhaustedError(RuntimeError):
    """The training data ended before ``train.train_iters``: the dataset holds fewer samples than it was asked for."""


class _TrainingBatches:
    """The training loader's batches; running out of them is an error that says why (a bare StopIteration would
    surface from deep inside megatron-core's pipeline schedule)."""

    def __init__(self, loader) -> None:
        self.loader, self._batches = loader, iter(loader)

    def __iter__(self) -> _TrainingBatches:
        return self

    def __next__(self):
        try:
            return next(self._batches)
        except StopIteration:
            sampler = self.loader.batch_sampler
            raise TrainingDataExhaustedError(
                f"the training data ran out: the dataset holds {sampler.dataset_len} samples and "
                f"{sampler.consumed_samples} have been read; a dataset config must build at least the samples it is "
                "asked for (train.train_iters x train.global_batch_size)") from None


def setup_run(cfg: ConfigContainer, *, finetune: bool) -> TrainingRun:
    """Build a run from ``cfg``: every rank calls it (``torchrun`` or a plain ``python`` for one process).

    Raises:
        ConfigError: for any invalid setting, before anything is built.
        CheckpointError: for an unwritable ``checkpoint.save`` or one holding checkpoints of another run (before
            anything is built), or a damaged resume checkpoint.
        ValueError / FileNotFoundError: for a missing pretrained or resume checkpoint (MissingCheckpointError,
            a CheckpointError, when the run needs one that is not there).
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    started_at = time.monotonic()
    if cfg.peft is not None and not finetune:
        raise ValueError("cfg.peft is set: use finetune(cfg, forward_step) for parameter-efficient fine-tuning")
    world_size = _world_size()
    tokenizer = build_run_tokenizer(cfg)  # before finalize: it may supply model.vocab_size; builds no model
    cfg.finalize(world_size=world_size)
    bridge = _model_bridge(cfg.model)
    if cfg.checkpoint.save:
        from .checkpointing import check_save_dir_writable, check_save_hf

        check_save_hf(cfg, bridge)  # before the save directory is created
        check_save_dir_writable(cfg.checkpoint.save)
    parallel = initialize_parallel(ParallelLayout.from_config(cfg.model), seed=cfg.rng.seed)
    parallel.seed(cfg.rng.seed, per_stage=True, data_parallel_random_init=cfg.rng.data_parallel_random_init)
    if parallel.rank == 0 and cfg.logger.print_config:
        print("---- resolved config ----\n" + cfg.to_yaml() + "-------------------------", flush=True)

    def say(line: str) -> None:
        if parallel.rank == 0:
            print(line, flush=True)

    resume = find_resume_checkpoint(cfg.checkpoint.load, fallback_to_previous=cfg.checkpoint.fallback_to_previous,
                                    say=say)
    taken = save_dir_problem(cfg.checkpoint.save, resume) if cfg.checkpoint.save else None
    if taken:
        raise CheckpointError(taken)
    saved_counters = check_resumable(resume, cfg) if resume is not None else None
    if cfg.checkpoint.load and resume is None:
        if cfg.checkpoint.exit_on_missing_checkpoint:
            raise MissingCheckpointError(f"checkpoint.load={cfg.checkpoint.load!r} holds no checkpoint and "
                                         "checkpoint.exit_on_missing_checkpoint is set")
        missing = "does not exist" if not os.path.exists(cfg.checkpoint.load) else "holds no checkpoint"
        say(f"checkpoint.load={cfg.checkpoint.load} {missing} (yet): nothing to resume, this run starts at iteration "
            "0 (checkpoint.exit_on_missing_checkpoint=true refuses instead)")
    hooks = []
    if finetune and callable(getattr(cfg.peft, "check_targets", None)):
        hooks.append(_peft_check_hook(cfg.peft))  # on the fresh model, before any weights load
    pretrained = cfg.checkpoint.pretrained_checkpoint  # its existence: the config check (CheckpointConfig)
    if cfg.checkpoint.finetune and not pretrained and resume is None:
        raise MissingCheckpointError(f"checkpoint.finetune is true but checkpoint.load={cfg.checkpoint.load!r} holds "
                                     "no checkpoint of this run to resume and checkpoint.pretrained_checkpoint is not "
                                     "set; point checkpoint.pretrained_checkpoint at the weights to fine-tune")
    # The weights to start from, whichever entry point (pretrain() continues pretraining from them). An adapter-only
    # PEFT checkpoint holds no base weights: the base comes from the pretrained one on resume too.
    if pretrained and (resume is None or adapter_only_checkpoints(cfg)):
        hooks.append(_pretrained_weights_hook(pretrained))
    if finetune and cfg.peft is not None:
        hooks.append(_peft_hook(cfg.peft))
    # The data before the model: a dataset that cannot be built fails before a large checkpoint is read.
    train_samples, valid_samples, test_samples = _dataset_sizes(cfg, saved_counters)
    train_ds, valid_ds, _ = cfg.dataset.build(tokenizer, train_samples=train_samples,
                                              valid_samples=valid_samples or None, test_samples=test_samples or None)
    split = getattr(cfg.dataset, "split", None)
    which = f" (dataset.split={split})" if isinstance(split, str) else ""
    if train_ds is None:
        raise ValueError(f"the dataset config produced no training data{which}; give the training split a share")
    if cfg.train.eval_interval and valid_ds is None and parallel.rank == 0:
        fields = [f"dataset.{name}" for name in ("split", "valid_path") if hasattr(cfg.dataset, name)]
        fix = ("give the validation split a share" if which
               else f"set {' or '.join(fields)} (e.g. dataset.split=90,5,5)" if fields else "give it validation data")
        logger.warning("train.eval_interval=%d, but the dataset has no validation data%s: no evaluation will run; "
                       "%s, or set train.eval_interval=null", cfg.train.eval_interval, which, fix)
    model = cfg.model.provide_distributed_model(
        wrap_with_ddp=True, ddp_config=cfg.ddp, pre_wrap_hooks=hooks, seed=cfg.rng.seed,
        overlap_param_gather_with_optimizer_step=False,
        data_parallel_random_init=cfg.rng.data_parallel_random_init)
    optimizer = get_megatron_optimizer(cfg.optimizer, model)
    if not parallel.on_cpu and cfg.model.transformer_impl == "native":
        # Without TE / apex, megatron-core steps with unfused AdamW and Python norm loops (~2x slower steps).
        from .optim import use_fused_optimizer_kernels

        use_fused_optimizer_kernels(optimizer)
    scheduler = OptimizerParamScheduler(optimizer, **cfg.scheduler.param_scheduler_kwargs(
        cfg.optimizer, cfg.train.train_iters))
    _wire_model_config(model, optimizer, cfg)
    cfg.model.finalize_model_grads_func = finalize_model_grads

    run = TrainingRun(cfg=cfg, parallel=parallel, model=model, optimizer=optimizer, scheduler=scheduler,
                      tokenizer=tokenizer, bridge=bridge, started_at=started_at,
                      train_state=TrainState(world_size=parallel.world_size, train_samples=train_samples,
                                             valid_samples=valid_samples))
    if finetune and adapter_only_checkpoints(cfg):  # what the checkpoints do not keep: merges / resumes compare it
        from bridge_convert.weights_fingerprint import base_weights_fingerprint

        run.extras["base fingerprint"] = base_weights_fingerprint(model)
    if (cfg.checkpoint.save and cfg.checkpoint.save_optim) or (resume is not None and cfg.checkpoint.load_optim):
        check_optimizer_checkpointable(optimizer, parallel.device)
    if resume is not None:
        saved = load_training_checkpoint(run, resume)
        run.train_state = TrainState(**{**saved.__dict__, "world_size": parallel.world_size,
                                        "train_samples": train_samples, "valid_samples": valid_samples})
        run.resumed_from = str(resume)
        say(f"resumed from {resume} at iteration {saved.iteration}")
        if saved.iteration >= cfg.train.train_iters:
            say(f"nothing left to train: the checkpoint is at iteration {saved.iteration} and train.train_iters is "
                f"{cfg.train.train_iters}; raise train.train_iters to train on")

    chunks = len(model)
    run.train_iterator = _iterators(cfg, train_ds, parallel, run.train_state.consumed_train_samples, cycle=False,
                                    chunks=chunks)
    if cfg.train.eval_interval and valid_ds is not None:
        run.valid_iterator = _iterators(cfg, valid_ds, parallel, run.train_state.consumed_valid_samples, cycle=True,
                                        chunks=chunks)
    seq_length = getattr(cfg.dataset, "seq_length", None) or cfg.model.seq_length
    packed = bool(getattr(cfg.dataset, "packed", False))
    # Packed micro-batches are flattened into one [1, B*S] row; the pipeline sends activations of that shape.
    run.schedule_seq_length = seq_length * cfg.train.micro_batch_size if packed else seq_length
    run.schedule_micro_batch_size = 1 if packed else cfg.train.micro_batch_size
    return run


def _wire_model_config(model: list, optimizer, cfg: ConfigContainer) -> None:
    """Hand megatron-core's schedules the hooks megatron-LM's training loop sets (loss scaling, grad sync)."""
    config = cfg.model  # every chunk's TransformerConfig is the provider itself
    config.grad_scale_func = optimizer.scale_loss
    if cfg.ddp.overlap_grad_reduce:
        sync = [m.no_sync for m in model]
        config.no_sync_func = sync[0] if len(model) == 1 else sync
        if getattr(cfg.ddp, "align_grad_reduce", True):
            grad_sync = [m.start_grad_sync for m in model]
            config.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync
    if cfg.ddp.overlap_param_gather and getattr(cfg.ddp, "align_param_gather", False):
        param_sync = [m.start_param_sync for m in model]
        config.param_sync_func = param_sync[0] if len(model) == 1 else param_sync
