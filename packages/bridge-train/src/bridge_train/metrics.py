"""Training metrics: the console / TensorBoard / W&B writers, with TFLOP/s and MFU from :mod:`bridge_train.flops`."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .flops import flops_per_token, peak_flops

__all__ = ["MetricsLogger", "flops_per_token", "peak_flops_per_device"]

logger = logging.getLogger("bridge")


def peak_flops_per_device() -> float | None:
    """Dense bf16 peak FLOP/s of this process's GPU, or None when unknown (CPU, unlisted card)."""
    if not torch.cuda.is_available():
        return None
    return peak_flops(torch.cuda.get_device_name())


def _memory_gb() -> tuple[str, float]:
    if torch.cuda.is_available():
        return "max allocated", torch.cuda.max_memory_allocated() / 2**30
    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    """Writes one line per ``log_interval`` (rank 0), TensorBoard scalars and W&B when configured."""

    def __init__(self, cfg, *, rank: int, world_size: int, flops_per_iteration: float, tokens_per_iteration: int,
                 start_iteration: int) -> None:
        self.cfg = cfg.logger
        self.train_iters = cfg.train.train_iters
        self.active = rank == 0
        self.world_size = world_size
        self.flops_per_iteration = flops_per_iteration
        self.tokens_per_iteration = tokens_per_iteration
        self.peak = peak_flops_per_device()
        self._last_time = time.perf_counter()
        self._last_iteration = start_iteration
        self._tb = None
        self._wandb = None
        self._bar = None
        if not self.active:
            return
        if self.cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=self.cfg.tensorboard_dir, max_queue=100)
        if self.cfg.wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise ValueError(f"logger.wandb_project={self.cfg.wandb_project!r} needs wandb: install "
                                 "bridge-train[wandb], or unset logger.wandb_project") from exc
            self._wandb = wandb.init(project=self.cfg.wandb_project, entity=self.cfg.wandb_entity,
                                     name=self.cfg.wandb_exp_name, dir=self.cfg.wandb_save_dir,
                                     config=cfg.to_dict())
        show_bar = self.cfg.progress_bar if self.cfg.progress_bar is not None else sys.stderr.isatty()
        if show_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.train_iters, initial=start_iteration, desc="training", unit="it",
                             dynamic_ncols=True)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (an evaluation, a checkpoint save) is left out of the iteration time and throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last_time += time.perf_counter() - start

    def logs_at(self, iteration: int) -> bool:
        """Whether :meth:`training` writes at ``iteration`` (the same answer on every rank)."""
        return iteration % self.cfg.log_interval == 0 or iteration == self.train_iters

    def training(self, iteration: int, metrics: dict[str, float]) -> None:
        """Record one iteration; prints and writes every ``log_interval`` iterations."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{metrics.get('lm loss', float('nan')):.4f}")
        if not self.logs_at(iteration):
            return
        now = time.perf_counter()
        iters = max(iteration - self._last_iteration, 1)
        seconds = (now - self._last_time) / iters
        self._last_time, self._last_iteration = now, iteration
        scalars = dict(metrics)
        scalars["iteration time (s)"] = seconds
        if self.cfg.log_throughput:
            scalars["tokens/s"] = self.tokens_per_iteration / seconds
            scalars["TFLOP/s per GPU"] = self.flops_per_iteration / seconds / self.world_size / 1e12
            if self.peak:
                scalars["MFU"] = self.flops_per_iteration / seconds / self.world_size / self.peak
        if self.cfg.log_memory:
            label, gb = _memory_gb()
            scalars[f"memory {label} (GB)"] = gb
        parts = [f"iteration {iteration:>{len(str(self.train_iters))}}/{self.train_iters}"]
        for key, value in scalars.items():
            if key == "MFU":
                parts.append(f"MFU {value * 100:.1f}%")
            elif key in ("lr",):
                parts.append(f"lr {value:.3e}")
            elif isinstance(value, float) and not math.isfinite(value):
                parts.append(f"{key} {value}")
            elif key in ("tokens/s",):
                parts.append(f"{key} {value:,.0f}")
            else:
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        line = " | ".join(parts)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        self._write(scalars, iteration, prefix="train/")

    def evaluation(self, iteration: int, name: str, loss: float) -> None:
        if not self.active:
            return
        ppl = math.exp(min(loss, 20.0))
        line = f"{name} at iteration {iteration} | lm loss {loss:.6g} | lm loss PPL {ppl:.6g}"
        (self._bar.write if self._bar is not None else print)(line)
        self._write({"lm loss": loss, "lm loss PPL": ppl}, iteration, prefix=f"{name}/")

    def message(self, text: str) -> None:
        if self.active:
            (self._bar.write if self._bar is not None else print)(text)

    def _write(self, scalars: dict[str, Any], iteration: int, prefix: str) -> None:
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(prefix + key, value, iteration)
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in scalars.items()}, step=iteration)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
