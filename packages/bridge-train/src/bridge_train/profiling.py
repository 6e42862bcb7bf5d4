"""torch.profiler traces and CUDA memory snapshots over a window of iterations (``cfg.profiling``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

__all__ = ["IterationProfiler"]

logger = logging.getLogger("bridge")


class IterationProfiler:
    """Profiles iterations ``[profile_step_start, profile_step_end)`` on the ranks in ``profile_ranks``.

    The trace goes to ``profile_dir`` (default: the TensorBoard directory) in TensorBoard / Chrome trace format; the
    CUDA memory history, when asked for, is dumped to ``memory_snapshot_path`` for pytorch.org/memory_viz.
    """

    def __init__(self, cfg, rank: int) -> None:
        p = cfg.profiling
        self.cfg = p
        self.trace_dir = p.profile_dir or cfg.logger.tensorboard_dir
        self.enabled = rank in p.profile_ranks and (p.use_pytorch_profiler or p.record_memory_history)
        self._profiler = None
        self._memory = False

    def before_iteration(self, iteration: int) -> None:
        """Call with the number of the iteration about to run (1-based)."""
        if not self.enabled or iteration != self.cfg.profile_step_start:
            return
        if self.cfg.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            Path(self.trace_dir).mkdir(parents=True, exist_ok=True)
            self._profiler = torch.profiler.profile(
                activities=activities, record_shapes=self.cfg.record_shapes, with_stack=False,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir))
            self._profiler.start()
        if self.cfg.record_memory_history:
            if torch.cuda.is_available():
                torch.cuda.memory._record_memory_history(max_entries=100_000)
                self._memory = True
            else:
                logger.warning("profiling.record_memory_history needs a CUDA device; no snapshot on CPU")

    def after_iteration(self, iteration: int) -> None:
        """Call with the number of the iteration that just finished."""
        if not self.enabled:
            return
        if self._profiler is not None:
            self._profiler.step()
        if iteration + 1 == self.cfg.profile_step_end:
            self.stop()

    def stop(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
            logger.info("profiler trace written to %s", self.trace_dir)
        if self._memory:
            path = self.cfg.memory_snapshot_path or str(Path(self.trace_dir or ".") / "memory_snapshot.pickle")
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
            self._memory = False
            logger.info("CUDA memory snapshot written to %s", path)
