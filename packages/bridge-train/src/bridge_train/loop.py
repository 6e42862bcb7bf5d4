"""The training loop: megatron-core's forward-backward schedules, the optimizer step, evaluation, logging,
checkpoints, and the exit conditions (iterations, ``exit_interval``, ``exit_duration_in_mins``, signals)."""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from .checkpointing import save_training_checkpoint
from .metrics import MetricsLogger, flops_per_token
from .profiling import IterationProfiler
from .setup import TrainingRun
from .signals import ExitRequests

__all__ = ["NonFiniteLossError", "evaluate", "train", "train_step"]

logger = logging.getLogger("bridge")


class NonFiniteLossError(RuntimeError):
    """Raised (robustness.nan_policy="stop") when the loss or the gradients stop being finite."""


def _reduce_losses(run: TrainingRun, losses: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average the per-micro-batch loss over micro-batches and data-parallel ranks; the same on every rank."""
    state = run.parallel
    value = torch.zeros(2, dtype=torch.float64, device=state.device)  # (sum of means, count)
    if state.is_last_pp_stage and losses:
        value[0] = sum(float(d["lm loss"]) for d in losses)
        value[1] = len(losses)
    if state.pp_size > 1:
        dist.broadcast(value, src=dist.get_process_group_ranks(state.pp_group)[-1], group=state.pp_group)
    if state.dp_size > 1 or state.cp_size > 1:
        dist.all_reduce(value, group=state.dp_group(with_context_parallel=True))
    return {"lm loss": float(value[0] / value[1]) if value[1] > 0 else float("nan")}


def _grads_finite(run: TrainingRun) -> bool:
    """Whether every gradient in the DDP buffers is finite, agreed across all ranks."""
    ok = torch.ones(1, dtype=torch.int32, device=run.parallel.device)
    for chunk in run.model:
        for buffer in [*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])]:
            if not torch.isfinite(buffer.grad_data).all():
                ok.zero_()
    if dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def train_step(run: TrainingRun, forward_step: Callable, iteration: int) -> tuple[dict[str, float], float, bool]:
    """One optimizer step over ``global_batch_size`` samples.

    Returns:
        (loss metrics, grad norm, whether the update was applied).

    Raises:
        NonFiniteLossError: when the loss or gradients are NaN/Inf and the policy is "stop" (or too many
            consecutive iterations were skipped).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = run.cfg
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=run.train_iterator, model=run.model,
        num_microbatches=cfg.num_microbatches(run.parallel.world_size), seq_length=run.schedule_seq_length,
        micro_batch_size=run.schedule_micro_batch_size, decoder_seq_length=run.schedule_seq_length,
        forward_only=False,
    )
    metrics = _reduce_losses(run, losses)
    finite = math.isfinite(metrics["lm loss"])
    if finite and not cfg.model.fp16:  # fp16 overflow is handled by megatron-core's loss scaler instead
        finite = _grads_finite(run)
    if not finite:
        where = f"iteration {iteration}: loss {metrics['lm loss']}"
        if cfg.robustness.nan_policy == "stop":
            raise NonFiniteLossError(f"non-finite loss or gradients at {where}; stopping (the last checkpoint is "
                                     "intact; set robustness.nan_policy=skip to skip such iterations instead)")
        logger.warning("non-finite loss or gradients at %s; skipping the update", where)
        return metrics, float("nan"), False
    applied, grad_norm, _ = run.optimizer.step()
    if applied:
        run.scheduler.step(increment=1)
    return metrics, float(grad_norm) if grad_norm is not None else float("nan"), bool(applied)


@torch.no_grad()
def evaluate(run: TrainingRun, forward_step: Callable) -> float:
    """Mean validation loss over ``train.eval_iters`` global batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = run.cfg
    for chunk in run.model:
        chunk.eval()
    total, count = 0.0, 0
    for _ in range(cfg.train.eval_iters):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=run.valid_iterator, model=run.model,
            num_microbatches=cfg.num_microbatches(run.parallel.world_size), seq_length=run.schedule_seq_length,
            micro_batch_size=run.schedule_micro_batch_size, decoder_seq_length=run.schedule_seq_length,
            forward_only=True,
        )
        total += _reduce_losses(run, losses)["lm loss"]
        count += 1
        run.train_state.consumed_valid_samples += cfg.train.global_batch_size
    for chunk in run.model:
        chunk.train()
    return total / max(count, 1)


def train(run: TrainingRun, forward_step: Callable) -> list[float]:
    """Run iterations until ``train.train_iters`` (or an exit condition); returns the per-iteration losses."""
    cfg, state = run.cfg, run.train_state
    seq = run.schedule_seq_length * run.schedule_micro_batch_size // cfg.train.micro_batch_size
    tokens_per_iteration = cfg.train.global_batch_size * seq
    flops_per_iteration = flops_per_token(cfg.model, seq) * tokens_per_iteration
    metrics_logger = MetricsLogger(cfg, rank=run.parallel.rank, world_size=run.parallel.world_size,
                                   flops_per_iteration=flops_per_iteration,
                                   tokens_per_iteration=tokens_per_iteration, start_iteration=state.iteration)
    exits = ExitRequests(cfg.robustness.exit_signals, enabled=cfg.robustness.exit_signal_handler,
                         exit_duration_in_mins=cfg.train.exit_duration_in_mins, device=run.parallel.device)
    profiler = IterationProfiler(cfg, run.parallel.rank)
    history: list[float] = []
    consecutive_skips = 0
    saved_at = state.iteration if run.resumed_from else None
    if cfg.train.manual_gc:
        gc.disable()
    for chunk in run.model:
        chunk.train()
    try:
        while state.iteration < cfg.train.train_iters:
            profiler.before_iteration(state.iteration + 1)
            loss, grad_norm, applied = train_step(run, forward_step, state.iteration + 1)
            state.iteration += 1
            profiler.after_iteration(state.iteration)
            if cfg.train.empty_unused_memory_level >= 1 and not run.parallel.on_cpu:
                torch.cuda.empty_cache()
            state.consumed_train_samples += cfg.train.global_batch_size
            if applied:
                consecutive_skips = 0
                state.floating_point_operations_so_far += flops_per_iteration
            else:
                state.skipped_iterations += 1
                consecutive_skips += 1
                limit = cfg.robustness.max_consecutive_skips
                if limit is not None and consecutive_skips > limit:
                    raise NonFiniteLossError(f"{consecutive_skips} consecutive iterations skipped (limit {limit}) "
                                             f"at iteration {state.iteration}")
            history.append(loss["lm loss"])
            metrics_logger.training(state.iteration, {**loss, "lr": run.optimizer.param_groups[0]["lr"],
                                                      "grad norm": grad_norm,
                                                      "skipped iterations": state.skipped_iterations})
            if cfg.train.manual_gc and cfg.train.manual_gc_interval and \
                    state.iteration % cfg.train.manual_gc_interval == 0:
                gc.collect()
            if cfg.train.eval_interval and run.valid_iterator is not None and \
                    state.iteration % cfg.train.eval_interval == 0:
                metrics_logger.evaluation(state.iteration, "validation", evaluate(run, forward_step))
                if cfg.train.manual_gc and cfg.train.manual_gc_eval:
                    gc.collect()
            if cfg.checkpoint.save and cfg.checkpoint.save_interval and \
                    state.iteration % cfg.checkpoint.save_interval == 0:
                save_training_checkpoint(run, state)
                saved_at = state.iteration
            reason = exits.should_exit()
            if reason is None and cfg.train.exit_interval and state.iteration % cfg.train.exit_interval == 0:
                reason = "exit_interval"
            if reason is not None:
                metrics_logger.message(f"exiting at iteration {state.iteration} ({reason})")
                break
        if cfg.checkpoint.save and saved_at != state.iteration:
            save_training_checkpoint(run, state)
    finally:
        profiler.stop()
        exits.close()
        metrics_logger.close()
        if cfg.train.manual_gc:
            gc.enable()
    return history
