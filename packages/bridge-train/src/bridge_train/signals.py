"""Exit requests: signals (SIGTERM from a scheduler, SIGINT from Ctrl-C, SIGUSR1 before a preemption) and a
wall-clock budget.

A second Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` at once, for a user who does not want to wait for the
save. Otherwise a handler only records the request; the loop asks :meth:`ExitRequests.should_exit` once per iteration, which
agrees across all ranks (one all-reduce), so every rank saves the same final checkpoint and stops together.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

__all__ = ["ExitRequests"]

logger = logging.getLogger("bridge")

_SIGNAL_BASE = 2
"""``should_exit``'s all-reduced code: 0 go on, 1 the duration budget, ``_SIGNAL_BASE + signal number`` a signal."""


class ExitRequests:
    """Installs handlers for ``signals`` until :meth:`close`; tracks the run's duration budget."""

    def __init__(self, signals: tuple[str, ...], *, enabled: bool, exit_duration_in_mins: float | None,
                 device: torch.device, started_at: float | None = None) -> None:
        """``started_at``: ``time.monotonic()`` the duration budget counts from (default: now)."""
        self.device = device
        self.received: str | None = None
        start = time.monotonic() if started_at is None else started_at
        self.deadline = start + 60 * exit_duration_in_mins if exit_duration_in_mins else None
        self._previous: dict[int, object] = {}
        if enabled and threading.current_thread() is not threading.main_thread():
            logger.warning("not installing the exit-signal handlers (%s): the run is not in the main thread, where "
                           "Python delivers signals; set robustness.exit_signal_handler=false to say so",
                           ", ".join(signals))
        elif enabled:
            for name in signals:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if number == signal.SIGINT and self.received == name:
            raise KeyboardInterrupt
        self.received = name
        if number == signal.SIGINT and (not dist.is_initialized() or dist.get_rank() == 0):
            sys.stderr.write("\nCtrl-C: finishing this iteration, saving a checkpoint (when checkpoint.save is set) "
                             "and exiting; press Ctrl-C again to stop at once without saving\n")

    def should_exit(self) -> str | None:
        """The reason to stop now (a signal name or "exit_duration"), identical on every rank, or None.

        A signal one rank received stops every rank under its name (of signals received by different ranks, the
        highest-numbered one), so a script that branches on the reason takes the same branch on every rank.
        """
        local = 0
        if self.received is not None:
            local = _SIGNAL_BASE + signal.Signals[self.received].value
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            local = 1
        value = local
        if dist.is_initialized() and dist.get_world_size() > 1:  # one process needs no device round trip
            flag = torch.tensor([local], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            value = int(flag.item())
        if value >= _SIGNAL_BASE:
            return signal.Signals(value - _SIGNAL_BASE).name
        return "exit_duration" if value == 1 else None

    def close(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
