"""Resuming with a changed learning rate, warmup or run length: the optimizer's moments kept, one schedule in force.

megatron-core pairs the saved optimizer parameter groups with the current ones by a key that includes each group's
``max_lr`` / ``min_lr`` (``param_group_identifier_keys``), and then replaces the current group's settings with the
saved ones. A resume with another ``optimizer.lr`` therefore fails (``Could not find parameter group with key
(None, 0.0005, ...)``), with or without ``override_opt_param_scheduler``, and would run at the old rate if it did
not. Groups are built in a fixed order from the model and the optimizer config, so here they are paired by
position (checked by their sizes), and each saved group takes the settings of the schedule in force before
megatron-core loads it: the saved per-parameter state (Adam moments, step) is kept as it is.
"""

from __future__ import annotations

from typing import Any

from .checkpoint_discovery import CheckpointError

__all__ = ["describe_schedule", "reconcile_param_groups"]

_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
"""Per-group settings the scheduler reads (megatron-core's ``ParamGroupOverride``, less the structural ones)."""

_FIELDS = {  # scheduler attribute / state_dict key -> the config field that sets it
    "max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr", "lr_warmup_steps": "scheduler.lr_warmup_iters",
    "lr_decay_steps": "scheduler.lr_decay_iters (default: train.train_iters)",
    "lr_decay_style": "scheduler.lr_decay_style", "start_wd": "scheduler.start_weight_decay",
    "end_wd": "scheduler.end_weight_decay", "wd_incr_steps": "train.train_iters (weight-decay ramp)",
    "wd_incr_style": "scheduler.weight_decay_incr_style",
}
_USE_CONFIG = "scheduler.override_opt_param_scheduler=true scheduler.use_checkpoint_opt_param_scheduler=false"


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _inner(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _states(optimizer, loaded: Any) -> list[dict]:
    inner = _inner(optimizer)
    if len(inner) == 1:
        return [loaded]
    if isinstance(loaded, dict):
        return [v for _, v in sorted(loaded.items())]
    return list(loaded)


def _saved_groups(state: dict) -> list[dict]:
    return state["param_groups"] if "param_groups" in state else state["optimizer"]["param_groups"]


def reconcile_param_groups(optimizer, loaded: Any, *, checkpoint_schedule: bool) -> None:
    """Rewrite the loaded optimizer state's parameter groups in place so that megatron-core's
    ``load_state_dict`` accepts them and the groups end up with the settings of the schedule in force.

    Args:
        optimizer: this run's megatron-core optimizer (chained or not).
        loaded: its state as loaded from the checkpoint (``sharded_state_dict`` filled by dist-checkpointing).
        checkpoint_schedule: True when the checkpoint's schedule is in force (the saved groups' ``max_lr`` etc.
            are copied onto the current groups); False when this run's config is.

    Raises:
        CheckpointError: when the groups differ in number or size (the model or the grouping changed).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = _inner(optimizer)
    states = _states(optimizer, loaded)
    if len(states) != len(inner):
        raise CheckpointError(f"the checkpoint holds {len(states)} optimizers' state, this run has {len(inner)}; "
                              "resume with checkpoint.load_optim=false to start the optimizer fresh")
    for opt, state in zip(inner, states):
        current = opt.optimizer.param_groups
        saved = _saved_groups(state)
        sizes_match = len(saved) == len(current)
        # The distributed optimizer takes the parameters of each group from the current shards; the others
        # index the saved per-parameter state by the saved group's parameter list.
        if sizes_match and not isinstance(opt, DistributedOptimizer):
            sizes_match = all(len(s["params"]) == len(c["params"]) for s, c in zip(saved, current))
        if not sizes_match:
            raise CheckpointError(
                f"the optimizer state in the checkpoint has parameter groups of sizes "
                f"{[len(g['params']) for g in saved]}, this run's optimizer "
                f"{[len(g['params']) for g in current]} (the model or the parameter grouping changed); resume "
                "with checkpoint.load_optim=false to start the optimizer fresh")
        for s, c in zip(saved, current):
            if checkpoint_schedule:
                c.update({k: s[k] for k in _SCHEDULE_KEYS if k in s})
            # the distributed optimizer saves no parameter list (it takes this run's shards) and, with torch's
            # Adam (no TE / apex), the step count in the group: both stay as saved
            kept = {k: s[k] for k in ("params", "step") if k in s}
            s.clear()
            s.update({k: v for k, v in c.items() if k != "params"}, **kept)


def describe_schedule(scheduler, saved: dict, *, train_iters: int, resumed_iteration: int) -> str:
    """One line saying which learning-rate schedule is in force after a resume, and what differs.

    Call before ``scheduler.load_state_dict(saved)`` (the scheduler still holds this run's config values).

    Raises:
        CheckpointError: when the config's schedule differs from the checkpoint's and neither
            ``use_checkpoint_opt_param_scheduler`` nor ``override_opt_param_scheduler`` says which one to use
            (megatron-core would fail on an assert).
    """
    diffs = [(key, saved[key], getattr(scheduler, key)) for key in _FIELDS
             if key in saved and saved[key] != getattr(scheduler, key)]
    listed = ", ".join(f"{_FIELDS[k]} {_fmt(old)} -> {_fmt(new)}" for k, old, new in diffs)
    if scheduler.override_opt_param_scheduler:
        return ("learning-rate schedule: this run's config (scheduler.override_opt_param_scheduler)"
                + (f"; changed from the checkpoint: {listed}" if diffs else "; the same as the checkpoint's"))
    if not scheduler.use_checkpoint_opt_param_scheduler:
        if diffs:
            raise CheckpointError(f"the config's schedule differs from the checkpoint's ({listed}) and neither "
                                  "scheduler.use_checkpoint_opt_param_scheduler nor "
                                  "scheduler.override_opt_param_scheduler is set; set "
                                  "scheduler.use_checkpoint_opt_param_scheduler=true to keep the checkpoint's, or "
                                  "scheduler.override_opt_param_scheduler=true to use the config's")
        return "learning-rate schedule: the checkpoint's (the config's is the same)"
    if not diffs:
        return "learning-rate schedule: the checkpoint's (the config's is the same)"
    line = ("learning-rate schedule: the checkpoint's (scheduler.use_checkpoint_opt_param_scheduler); NOT using "
            "the config's " + ", ".join(f"{_FIELDS[k]} {_fmt(new)} (checkpoint: {_fmt(old)})" for k, old, new in diffs)
            + f"; to use them set {_USE_CONFIG}")
    decay_end = saved.get("lr_decay_steps")
    if decay_end is not None and train_iters > decay_end and saved.get("lr_decay_style") != "constant":
        first = max(decay_end, resumed_iteration) + 1
        line += (f". WARNING: train.train_iters={train_iters} runs past the checkpoint's decay end ({decay_end}): "
                 f"iterations {first}..{train_iters} run at the minimum learning rate {_fmt(saved.get('min_lr'))}")
    return line
