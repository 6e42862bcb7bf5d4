"""What the loop logs and where: console line, TensorBoard, Weights & Biases."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .fields import at_least

__all__ = ["LoggerConfig"]


@dataclass(kw_only=True, slots=True)
class LoggerConfig:
    """Console, TensorBoard and W&B logging."""

    log_interval: int = 10
    """Print a console line (and write scalars) every this many iterations."""
    tensorboard_dir: str | None = None
    """Directory for TensorBoard event files; None: no TensorBoard."""
    wandb_project: str | None = None
    """Weights & Biases project; None: no W&B (needs the ``wandb`` extra when set)."""
    wandb_entity: str | None = None
    """W&B entity (team or user); None: the default entity."""
    wandb_exp_name: str | None = None
    """W&B run name; None: W&B picks one."""
    wandb_save_dir: str | None = None
    """Local directory for W&B files; None: W&B's default."""
    log_throughput: bool = True
    """Log tokens/s, TFLOP/s per GPU and MFU."""
    log_memory: bool = True
    """Log the peak device memory allocated (``memory max allocated (GB)``; the peak RSS on CPU)."""
    log_params_norm: bool = False
    """Log the L2 norm of all parameters (costs an all-reduce)."""
    progress_bar: bool | None = None
    """Show a tqdm progress bar (on stderr); None: only when stderr is an interactive terminal."""
    print_config: bool = True
    """Print the resolved config (YAML) at start, on rank 0."""

    def check(self, prefix: str = "logger") -> list[str]:
        """Problems with this config alone; a W&B project without the ``wandb`` package is one."""
        problems = at_least(self, prefix, log_interval=1)
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            problems.append(f"{prefix}.wandb_project is {self.wandb_project!r} but wandb is not installed; "
                            f"install bridge-train[wandb] or set {prefix}.wandb_project=null")
        unused = [] if self.wandb_project else ("wandb_entity", "wandb_exp_name", "wandb_save_dir")
        problems += [f"{prefix}.{name} is set but {prefix}.wandb_project is not (no W&B run); set "
                     f"{prefix}.wandb_project, or {prefix}.{name}=null" for name in unused if getattr(self, name)]
        return problems
