"""The two ways the config system reports trouble: one error listing every problem, and a warning class."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ConfigError", "ConfigWarning"]


class ConfigError(ValueError):
    """Every problem found in a config (or a set of overrides), raised together.

    Each entry of :attr:`problems` names the dotted field (``train.global_batch_size``), the value and the fix.
    """

    def __init__(self, problems: Sequence[str], header: str = "invalid config") -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(f"{header} ({count} problem{'s' if count != 1 else ''}):\n  - {lines}")


class ConfigWarning(UserWarning):
    """A setting was ignored or could not be saved; the message names it."""
