"""The training loop: megatron-core's forward-backward schedules, the optimizer step, evaluation, logging,
checkpoints, and the exit conditions (iterations, ``exit_interval``, ``exit_duration_in_mins``, signals)."""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from .checkpoint_discovery import CheckpointError
from .checkpointing import AsyncSaves, save_training_checkpoint
from .forward_step import adapt_forward_step
from .metrics import MetricsLogger, flops_per_token
from .params_norm import params_l2_norm
from .profiling import IterationProfiler
from .setup import TrainingRun
from .signals import ExitRequests

__all__ = ["NonFiniteLossError", "TrainingResult", "evaluate", "train", "train_step"]

logger = logging.getLogger("bridge")


class NonFiniteLossError(RuntimeError):
    """Raised (robustness.nan_policy="stop") when the loss or the gradients stop being finite."""


def _reduce_losses(run: TrainingRun, losses: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """``lm loss`` and every other key the loss function reports, over micro-batches and data-parallel ranks; the
    same on every rank.

    A micro-batch reports each as its mean (averaged over micro-batches) or ``[sum, tokens]`` (per-token loss,
    megatron-core's reporting form: the sum over all tokens divided by their number).
    """
    keys = ("lm loss", *_extra_loss_keys(run, losses))
    *sums, other_keys = _loss_sums(run, losses, keys, same_keys=True).tolist()  # one copy to the host
    if other_keys > 0:
        from .forward_step import ForwardStepSignatureError

        raise ForwardStepSignatureError(f"the loss function must report the keys of the first iteration, "
                                        f"{list(keys)}, every time (the loop logs each); it reported others")
    return {key: sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] > 0 else float("nan") for i, key in enumerate(keys)}


def _extra_loss_keys(run: TrainingRun, losses: list) -> list[str]:
    """The keys beside ``lm loss`` of the first training iteration's loss dicts (sent to every rank once: the
    other pipeline stages have no losses), which every later iteration must report too."""
    if "loss keys" in run.extras:
        return run.extras["loss keys"]
    state = run.parallel
    keys = sorted(k for k in losses[0] if k != "lm loss") if (
        state.is_last_pp_stage and losses and isinstance(losses[0], dict)) else []
    if state.pp_size > 1:
        box = [keys]
        dist.broadcast_object_list(box, src=dist.get_process_group_ranks(state.pp_group)[-1], group=state.pp_group)
        keys = box[0]
    if state.dp_size > 1 or state.cp_size > 1:
        group = state.dp_group(with_context_parallel=True)
        seen: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(seen, keys, group=group)
        if any(other != keys for other in seen):
            from .forward_step import ForwardStepSignatureError

            raise ForwardStepSignatureError(f"the loss function reports other keys on other data-parallel ranks "
                                            f"({sorted(map(str, seen))}); report the same keys on every rank")
    run.extras["loss keys"] = keys
    return keys


def _loss_sums(run: TrainingRun, losses: list[dict[str, torch.Tensor]], keys: tuple[str, ...] = ("lm loss",),
               same_keys: bool = False) -> torch.Tensor:
    """``(sum of micro-batch means or of token losses, their count)`` of each of ``keys`` (``lm loss`` first) over
    micro-batches and data-parallel ranks, then a flag (> 0) when a loss dict's keys were not exactly ``keys``
    (``same_keys``; the caller checks it on the host copy it makes anyway: no sync of its own)."""
    state = run.parallel
    value = torch.zeros(2 * len(keys) + 1, dtype=torch.float64, device=state.device)  # the last: other keys seen
    bad_key = state.is_last_pp_stage and bool(losses) and (not isinstance(losses[0], dict)
                                                           or "lm loss" not in losses[0])
    if bad_key:  # said on every stage: the others wait for the broadcast below
        got = sorted(losses[0]) if isinstance(losses[0], dict) else type(losses[0]).__name__
        value[1] = -1.0
    elif state.is_last_pp_stage and losses:
        for d in losses:  # on the device: no host sync per micro-batch
            if same_keys and set(d) != set(keys):
                value[-1] = 1.0
                continue
            for i, key in enumerate(keys):
                reported = torch.as_tensor(d[key]).detach().reshape(-1).to(value)  # a float from user code too
                value[2 * i] += reported[0]
                value[2 * i + 1] += reported[1] if reported.numel() == 2 else 1.0
    if state.pp_size > 1:
        dist.broadcast(value, src=dist.get_process_group_ranks(state.pp_group)[-1], group=state.pp_group)
    if bad_key or (not state.is_last_pp_stage and value[1] < 0):
        from .forward_step import ForwardStepSignatureError

        raise ForwardStepSignatureError(
            "the forward step's loss function must report its loss under the key 'lm loss' (as "
            f"`return loss, {{'lm loss': loss}}`), got {got if bad_key else 'other keys (on the last pipeline stage)'}"
            "; the loop reduces, logs and checks that key")
    if state.dp_size > 1 or state.cp_size > 1:
        dist.all_reduce(value, group=state.dp_group(with_context_parallel=True))
    return value


def _grads_finite(run: TrainingRun) -> bool:
    """Whether every gradient in the DDP buffers is finite, agreed across all ranks.

    One sum per buffer (a single read of the gradients, no host sync until the end) instead of an elementwise
    ``isfinite``: a NaN or inf anywhere makes the sum non-finite. (A sum of finite gradients overflows only past
    ~1e38 / 1e9 per element, where the gradient norm the optimizer computes has long overflowed too.) The isfinite
    pass cost ~5 ms of a Llama-3.2-1B step on one H200 (profiled); a sum is one read of the fp32 gradients.
    """
    sums = [buffer.grad_data.sum(dtype=torch.float32)
            for chunk in run.model
            for buffer in [*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])]]
    ok = torch.isfinite(torch.stack(sums)).all().to(torch.int32).reshape(1) if sums else \
        torch.ones(1, dtype=torch.int32, device=run.parallel.device)
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


def _loss_scale_floor(cfg) -> str:
    opt = cfg.optimizer
    return f"static loss_scale {opt.loss_scale}" if opt.loss_scale is not None else f"min_loss_scale {opt.min_loss_scale}"


def _loss_scale_at_floor(run: TrainingRun) -> bool:
    """fp16: the loss scale cannot shrink any more (a static ``loss_scale``, or the dynamic one at ``min_loss_scale``)."""
    opt = run.cfg.optimizer
    return opt.loss_scale is not None or float(run.optimizer.get_loss_scale()) <= opt.min_loss_scale


@torch.no_grad()
def evaluate(run: TrainingRun, forward_step: Callable) -> float:
    """Validation loss over ``train.eval_iters`` global batches: with per-token losses
    (``model.calculate_per_token_loss``) the sum over every token of them by their number, else the mean of the
    micro-batch means."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = run.cfg
    for chunk in run.model:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.parallel.device)
    for _ in range(cfg.train.eval_iters):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=run.valid_iterator, model=run.model,
            num_microbatches=cfg.num_microbatches(run.parallel.world_size), seq_length=run.schedule_seq_length,
            micro_batch_size=run.schedule_micro_batch_size, decoder_seq_length=run.schedule_seq_length,
            forward_only=True,
        )
        total += _loss_sums(run, losses)[:2]  # summed whole: an average of per-batch ratios weighs tokens unequally
        run.train_state.consumed_valid_samples += cfg.train.global_batch_size
    for chunk in run.model:
        chunk.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def finish_param_gather(model: list) -> None:
    """Bring every rank's copy of the weights up to date before code outside a training forward reads them.

    With the distributed optimizer's overlapped all-gather (``ddp.overlap_param_gather``, the recipes' default),
    a step updates only this rank's shard of the weights; the other shards arrive through forward pre-hooks of
    the next forward. Checkpoints, HF exports, the parameter norm and the model :func:`train` returns read the
    weights without one, so this runs megatron-core's forced (synchronous) parameter sync first. The next forward
    then finds nothing left to gather; a no-op without the overlap.
    """
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):
            with torch.no_grad():
                chunk.start_param_sync(force_sync=True)


class TrainingResult(list):
    """What :func:`train` (and so ``pretrain`` / ``finetune``) returns: the loss of every iteration this call ran
    (it *is* that list, so code that used the list keeps working), plus the trained pieces, for use in the same
    process (e.g. ``bridge.save_hf_pretrained(result.model, "out")``)."""

    def __init__(self, losses: list[float], run: TrainingRun, exit_reason: str | None) -> None:
        super().__init__(losses)
        self.run = run
        self.exit_reason = exit_reason
        """Why the loop stopped early ("SIGTERM", "SIGINT", "exit_interval", "exit_duration"), None at train_iters."""

    @property
    def losses(self) -> list[float]:
        return list(self)

    def __reduce__(self):
        # Pickled (sent to another process, saved) it is the plain loss list: the model and its process groups
        # belong to this process.
        return list, (list(self),)

    @property
    def model(self) -> list:
        """This rank's trained model chunks (DDP-wrapped), as ``AutoBridge.save_hf_pretrained`` takes them."""
        return self.run.model

    @property
    def state(self):
        """The counters (:class:`bridge_train.checkpointing.TrainState`): iteration, consumed samples, ..."""
        return self.run.train_state

    @property
    def bridge(self):
        """The model's ``AutoBridge`` (None when the provider names no HF architecture)."""
        return self.run.bridge


class _Housekeeping:
    """The documented memory settings: ``train.manual_gc*`` and ``train.empty_unused_memory_level``."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg.train

    def start(self) -> None:
        if self.cfg.manual_gc:
            gc.disable()

    def stop(self) -> None:
        if self.cfg.manual_gc:
            gc.enable()

    def after_step(self, iteration: int) -> None:
        if self.cfg.empty_unused_memory_level >= 1:
            torch.cuda.empty_cache()  # a no-op without CUDA
        if self.cfg.manual_gc and self.cfg.manual_gc_interval and iteration % self.cfg.manual_gc_interval == 0:
            gc.collect()

    def around_evaluation(self, after: bool) -> None:
        if self.cfg.manual_gc and self.cfg.manual_gc_eval:
            gc.collect()
        if after and self.cfg.empty_unused_memory_level >= 2:
            torch.cuda.empty_cache()

    def at_checkpoint(self) -> None:
        if self.cfg.manual_gc and not self.cfg.manual_gc_interval:
            gc.collect()


def _finish_pending_save(async_saves: AsyncSaves, exc: BaseException, world_size: int, metrics_logger) -> None:
    """On the way out of a failed run, make the background save in flight durable and the latest, where that
    cannot hang: finalizing takes every rank, so only one process, or an error every rank raises at the same
    iteration (a non-finite streak: the grad norm is all-reduced). Elsewhere the previous checkpoint stays the
    latest."""
    if world_size > 1 and not isinstance(exc, NonFiniteLossError):
        metrics_logger.message("the background checkpoint save in flight was not finalized (finalizing takes "
                               "every rank); the previous checkpoint stays the latest")
        return
    metrics_logger.message(f"{type(exc).__name__}: finishing the background checkpoint save in flight first")
    try:
        async_saves.wait()
    except CheckpointError as failed:  # the run's own error is the one raised
        metrics_logger.message(str(failed))


def train(run: TrainingRun, forward_step: Callable) -> TrainingResult:
    """Run iterations until ``train.train_iters`` (or an exit condition).

    ``forward_step`` is ``forward_step(data_iterator, model)`` or Megatron Bridge's
    ``forward_step(state, data_iterator, model)`` (``state`` is ``run``).

    Returns:
        A :class:`TrainingResult`: the per-iteration losses, and the model and counters.
    """
    cfg, state = run.cfg, run.train_state
    forward_step = adapt_forward_step(forward_step, run)
    seq = run.schedule_seq_length * run.schedule_micro_batch_size // cfg.train.micro_batch_size
    tokens_per_iteration = cfg.train.global_batch_size * seq
    flops_per_iteration = flops_per_token(cfg.model, seq) * tokens_per_iteration
    metrics_logger = MetricsLogger(cfg, rank=run.parallel.rank, world_size=run.parallel.world_size,
                                   flops_per_iteration=flops_per_iteration,
                                   tokens_per_iteration=tokens_per_iteration, start_iteration=state.iteration)
    exits = ExitRequests(cfg.robustness.exit_signals, enabled=cfg.robustness.exit_signal_handler,
                         exit_duration_in_mins=cfg.train.exit_duration_in_mins, device=run.parallel.device,
                         started_at=run.started_at)
    profiler = IterationProfiler(cfg, run.parallel.rank)
    housekeeping = _Housekeeping(cfg)
    async_saves = AsyncSaves() if cfg.checkpoint.save and cfg.checkpoint.async_save else None
    history: list[float] = []
    consecutive_skips = 0
    saved_at = state.iteration if run.resumed_from else None
    save_due = postponed = False
    reason = None

    gathered_at = None  # the iteration whose weights every rank's copy holds in full

    def gather() -> None:  # once per iteration, however many readers (params norm, save, the end) it has
        nonlocal gathered_at
        if gathered_at != state.iteration:
            finish_param_gather(run.model)
            gathered_at = state.iteration

    def save() -> None:
        nonlocal saved_at, save_due, postponed
        with metrics_logger.paused():  # not an iteration's time (nor its throughput)
            housekeeping.at_checkpoint()
            gather()
            save_training_checkpoint(run, state, async_saves=async_saves)
        saved_at, save_due, postponed = state.iteration, False, False

    housekeeping.start()
    for chunk in run.model:
        chunk.train()
    try:
        while state.iteration < cfg.train.train_iters:
            profiler.before_iteration(state.iteration + 1)
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this iteration's update uses (the step moves it on)
            loss, grad_norm, applied = train_step(run, forward_step, state.iteration + 1)
            state.iteration += 1
            profiler.after_iteration(state.iteration)
            housekeeping.after_step(state.iteration)
            if async_saves is not None:
                async_saves.poll()
            state.consumed_train_samples += cfg.train.global_batch_size
            # fp16: a finite loss whose step was not applied is the loss scaler backing off from an overflow (it
            # starts at 2**32): megatron-core's normal start, counted as skipped but no non-finite streak, unless
            # the scale cannot shrink any more (then no scale makes the gradients fit: it is one)
            scaler_skip = not applied and cfg.model.fp16 and math.isfinite(loss["lm loss"])
            at_floor = scaler_skip and _loss_scale_at_floor(run)
            if applied:
                consecutive_skips = 0
                state.floating_point_operations_so_far += flops_per_iteration
            elif scaler_skip and not at_floor:
                state.skipped_iterations += 1
            else:
                state.skipped_iterations += 1
                consecutive_skips += 1
                limit = cfg.robustness.max_consecutive_skips
                if limit is not None and consecutive_skips > limit:
                    why = (f": the fp16 gradients overflow at the smallest loss scale ({_loss_scale_floor(cfg)}; "
                           "lower the learning rate or train in bf16)") if at_floor else ""
                    raise NonFiniteLossError(f"{consecutive_skips} consecutive iterations skipped (limit {limit}) "
                                             f"at iteration {state.iteration}{why}")
            history.append(loss["lm loss"])
            scalars = {**loss, "lr": lr, "grad norm": grad_norm,
                       "skipped iterations": state.skipped_iterations}
            if cfg.logger.log_params_norm and metrics_logger.logs_at(state.iteration):
                gather()
                scalars["params norm"] = params_l2_norm(run.model, run.parallel.device)
            metrics_logger.training(state.iteration, scalars)
            if cfg.train.eval_interval and run.valid_iterator is not None and \
                    state.iteration % cfg.train.eval_interval == 0:
                with metrics_logger.paused():
                    housekeeping.around_evaluation(after=False)
                    metrics_logger.evaluation(state.iteration, "validation", evaluate(run, forward_step))
                    housekeeping.around_evaluation(after=True)
            if cfg.checkpoint.save and cfg.checkpoint.save_interval and \
                    state.iteration % cfg.checkpoint.save_interval == 0:
                save_due = True
            if save_due and consecutive_skips:  # never make a checkpoint inside a non-finite streak the latest
                if not postponed:
                    metrics_logger.message(f"checkpoint at iteration {state.iteration} postponed: the last "
                                           f"{consecutive_skips} iteration(s) were skipped as non-finite; saving "
                                           "after the next finite one")
                postponed = True
            elif save_due:
                save()
            reason = exits.should_exit()
            if reason is None and cfg.train.exit_interval and state.iteration % cfg.train.exit_interval == 0 \
                    and state.iteration < cfg.train.train_iters:  # at train_iters the run simply ends
                reason = "exit_interval"
            if reason is not None:
                metrics_logger.message(f"exiting at iteration {state.iteration} ({reason})")
                break
        if cfg.checkpoint.save and saved_at != state.iteration:
            if consecutive_skips:
                latest = (f"the latest checkpoint stays at iteration {saved_at}" if saved_at is not None
                          else "no checkpoint was written")
                metrics_logger.message(f"not saving a checkpoint at iteration {state.iteration}: the last "
                                       f"{consecutive_skips} iteration(s) were skipped as non-finite; {latest}")
            else:
                save()
        if async_saves is not None:
            async_saves.wait()
        gather()  # the returned model holds the trained weights on every rank
    except Exception as exc:  # (Ctrl-C leaves at once: the previous checkpoint stays the latest)
        if async_saves is not None and async_saves.pending and not isinstance(exc, CheckpointError):
            _finish_pending_save(async_saves, exc, run.parallel.world_size, metrics_logger)
        raise
    finally:
        profiler.stop()
        exits.close()
        metrics_logger.close()
        housekeeping.stop()
    return TrainingResult(history, run, reason)
