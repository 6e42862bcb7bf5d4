"""What the training loop itself reads: batch sizes and lengths, seeds, and what to do when things go wrong."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

from .fields import at_least

__all__ = ["RNGConfig", "RobustnessConfig", "TrainConfig"]


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Batch sizes, run length, evaluation cadence and exit conditions of the loop."""

    train_iters: int
    """Optimizer steps to run in total (a resumed run continues up to this count)."""
    micro_batch_size: int = 1
    """Samples in one forward/backward pass on one data-parallel rank."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all data-parallel ranks; None: micro_batch_size x DP (no accumulation)."""
    eval_interval: int | None = None
    """Evaluate at every multiple of this many iterations (a last iteration that is not one gets none); None: never
    evaluate."""
    eval_iters: int = 10
    """Micro-batch groups (global batches) per evaluation."""
    exit_interval: int | None = None
    """Save (if checkpointing is on) and exit when the iteration is a multiple of this; None: off."""
    exit_duration_in_mins: float | None = None
    """Save and exit once the run has taken this many minutes, counted from the start of setup (building the model
    and loading checkpoints included); None: no time limit."""
    manual_gc: bool = False
    """Disable Python's automatic garbage collector and collect every ``manual_gc_interval`` iterations on all
    ranks together (avoids stragglers from uncoordinated GC pauses)."""
    manual_gc_interval: int = 0
    """Iterations between manual collections; 0: collect at each checkpoint save instead (collections around
    evaluations are ``manual_gc_eval``'s)."""
    manual_gc_eval: bool = True
    """With manual_gc, also collect before and after each evaluation."""
    empty_unused_memory_level: Literal[0, 1, 2] = 0
    """Call torch.cuda.empty_cache(): 0 never, 1 after each optimizer step, 2 also after each evaluation."""

    def check(self, prefix: str = "train") -> list[str]:
        """Problems with this config alone (batch divisibility by DP is the container's check)."""
        problems = at_least(self, prefix, train_iters=1, micro_batch_size=1, global_batch_size=1, eval_interval=1,
                            eval_iters=0, exit_interval=1, manual_gc_interval=0)
        if self.eval_interval is not None and self.eval_iters == 0:
            problems.append(f"{prefix}.eval_iters is 0 but {prefix}.eval_interval is {self.eval_interval}: "
                            f"set {prefix}.eval_iters >= 1, or {prefix}.eval_interval=null to turn evaluation off")
        problems += at_least(self, prefix, above=True, exit_duration_in_mins=0)
        if self.manual_gc_interval and not self.manual_gc:
            problems.append(f"{prefix}.manual_gc_interval={self.manual_gc_interval} has no effect while "
                            f"{prefix}.manual_gc is false; set {prefix}.manual_gc=true or the interval to 0")
        return problems


@dataclass(kw_only=True, slots=True)
class RNGConfig:
    """Seeds for weight initialisation, dropout and data order."""

    seed: int = 1234
    """Base seed; megatron-core derives the per-TP/PP-rank seeds from it."""
    data_parallel_random_init: bool = False
    """Let data-parallel replicas start from different random weights (else rank 0's are broadcast)."""

    def check(self, prefix: str = "rng") -> list[str]:
        """Problems with this config alone."""
        return [f"{prefix}.seed must be in [0, 2**63), got {self.seed}"] if not 0 <= self.seed < 2**63 else []


@dataclass(kw_only=True, slots=True)
class RobustnessConfig:
    """What the loop does on a non-finite loss or gradient norm, and on a termination signal."""

    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/Inf loss or grad norm: "stop" raises with the iteration number; "skip" drops that step's update
    (the optimizer step is not applied) and goes on."""
    max_consecutive_skips: int | None = 10
    """With nan_policy="skip", stop anyway after this many non-finite iterations in a row (and, under either policy,
    after this many fp16 updates in a row that overflow at the smallest loss scale); None: never."""
    exit_signal_handler: bool = True
    """Catch ``exit_signals``: finish the current iteration, save a checkpoint (if saving is on) and exit cleanly."""
    exit_signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")
    """Signal names the handler catches (SIGINT is Ctrl-C: a second Ctrl-C stops at once, without saving)."""

    def check(self, prefix: str = "robustness") -> list[str]:
        """Problems with this config alone."""
        problems = at_least(self, prefix, max_consecutive_skips=1)
        valid = set(signal.Signals.__members__)
        unknown = [name for name in self.exit_signals if name not in valid]
        if unknown:
            problems.append(f"{prefix}.exit_signals has unknown signal names {unknown}; use names such as "
                            "SIGTERM, SIGUSR1, SIGINT")
        uncatchable = [name for name in self.exit_signals if name in ("SIGKILL", "SIGSTOP")]
        if uncatchable:
            problems.append(f"{prefix}.exit_signals names {uncatchable}, which no process can catch; use SIGTERM, "
                            "SIGUSR1 or SIGINT")
        if self.exit_signal_handler and not self.exit_signals:
            problems.append(f"{prefix}.exit_signals is empty while {prefix}.exit_signal_handler is true; "
                            "name at least one signal or turn the handler off")
        return problems
