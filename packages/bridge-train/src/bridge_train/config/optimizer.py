"""Optimizer and learning-rate / weight-decay schedule.

:class:`OptimizerConfig` *is* megatron-core's ``OptimizerConfig`` (pass it straight to ``get_megatron_optimizer``);
it only moves megatron-core's construction-time checks (asserts, in ``__post_init__``) to :meth:`finalize`, so a
config can be built and edited first and every problem is reported at once. :class:`SchedulerConfig` holds what
megatron-core's ``OptimizerParamScheduler`` takes, in iterations; :meth:`SchedulerConfig.param_scheduler_kwargs`
maps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from megatron.core.optimizer import OptimizerConfig as MCoreOptimizerConfig

from .fields import at_least

__all__ = ["OptimizerConfig", "SchedulerConfig"]

OPTIMIZERS = ("adam", "sgd")
_PRECISION_AWARE_DTYPES = ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype")


@dataclass(kw_only=True)
class OptimizerConfig(MCoreOptimizerConfig):
    """megatron-core's OptimizerConfig (Adam or SGD, lr, min_lr, weight_decay, betas, eps, clip_grad,
    use_distributed_optimizer, fp16/bf16 and loss scaling, which mixed precision sets) with two-phase checks.

    Every field keeps megatron-core's name, default and docstring.
    """

    def __post_init__(self) -> None:
        # megatron-core asserts on field combinations here; those checks run in finalize(), after all edits.
        self._finalized = False

    def check(self, prefix: str = "optimizer") -> list[str]:
        """Problems with this config alone, as messages naming ``prefix.field``."""
        problems = at_least(self, prefix, hysteresis=1, loss_scale_window=1, weight_decay=0)
        problems += at_least(self, prefix, above=True, null_disables=False, lr=0, adam_eps=0, loss_scale=0,
                             initial_loss_scale=0, min_loss_scale=0)
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"{prefix}.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is None:
            problems.append(f"{prefix}.lr is not set; set the peak learning rate, e.g. {prefix}.lr=3e-4")
        if self.min_lr is not None and self.min_lr < 0:
            problems.append(f"{prefix}.min_lr must be >= 0, got {self.min_lr}")
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            problems.append(f"{prefix}.min_lr ({self.min_lr}) must be <= {prefix}.lr ({self.lr})")
        problems += [f"{prefix}.{name} must be in [0, 1), got {getattr(self, name)}"
                     for name in ("adam_beta1", "adam_beta2", "sgd_momentum") if not 0 <= getattr(self, name) < 1]
        if self.clip_grad < 0:
            problems.append(f"{prefix}.clip_grad must be >= 0 (0 turns clipping off), got {self.clip_grad}")
        if self.fp16 and self.bf16:
            problems.append(f"{prefix}.fp16 and {prefix}.bf16 are both true; pick one (mixed_precision sets them)")
        if self.use_precision_aware_optimizer:
            if self.optimizer != "adam" or not self.use_distributed_optimizer:
                problems.append(f"{prefix}.use_precision_aware_optimizer needs {prefix}.optimizer='adam' and "
                                f"{prefix}.use_distributed_optimizer=true")
        else:
            low = [n for n in _PRECISION_AWARE_DTYPES if getattr(self, n) != torch.float32]
            if low:
                problems.append(f"{prefix}.{', '.join(low)} other than float32 need "
                                f"{prefix}.use_precision_aware_optimizer=true; set them to float32")
        if self.reuse_grad_buf_for_mxfp8_param_ag and self.overlap_param_gather_with_optimizer_step:
            problems.append(f"{prefix}.reuse_grad_buf_for_mxfp8_param_ag cannot be combined with "
                            f"{prefix}.overlap_param_gather_with_optimizer_step; turn one off")
        return problems

    def finalize(self) -> None:
        """Derive ``min_lr`` (None -> 0.0) and run megatron-core's own checks; idempotent.

        Raises:
            ValueError, AssertionError, RuntimeError: from megatron-core for combinations :meth:`check` does
                not cover (the container reports them as ``optimizer: ...``).
        """
        if self._finalized:
            return
        if self.min_lr is None:
            self.min_lr = 0.0
        MCoreOptimizerConfig.__post_init__(self)
        self._finalized = True


@dataclass(kw_only=True, slots=True)
class SchedulerConfig:
    """Learning-rate warmup/decay and weight-decay schedule, in iterations (optimizer steps).

    The peak and floor learning rates are ``optimizer.lr`` / ``optimizer.min_lr``; the weight decay defaults to
    ``optimizer.weight_decay`` throughout.
    """

    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    """Shape of the decay after warmup. WSD: warmup, stable at lr, then decay over lr_wsd_decay_iters."""
    lr_warmup_iters: int = 0
    """Iterations of linear warmup from lr_warmup_init to optimizer.lr."""
    lr_warmup_fraction: float | None = None
    """Warmup as a fraction of lr_decay_iters (instead of lr_warmup_iters); None: use lr_warmup_iters."""
    lr_warmup_init: float = 0.0
    """Learning rate at the first warmup iteration."""
    lr_decay_iters: int | None = None
    """Iterations over which the learning rate decays to optimizer.min_lr; None: train.train_iters."""
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "exponential"
    """Shape of the final decay phase of WSD."""
    lr_wsd_decay_iters: int | None = None
    """Length of the final decay phase of WSD (required for WSD)."""
    start_weight_decay: float | None = None
    """Weight decay at iteration 0; None: optimizer.weight_decay."""
    end_weight_decay: float | None = None
    """Weight decay at train.train_iters; None: optimizer.weight_decay."""
    weight_decay_incr_style: Literal["constant", "linear", "cosine"] = "constant"
    """How weight decay moves from start_weight_decay to end_weight_decay."""
    use_checkpoint_opt_param_scheduler: bool = True
    """On resume, take the schedule settings stored in the checkpoint."""
    override_opt_param_scheduler: bool = False
    """On resume, use this config's schedule settings instead of the checkpoint's."""

    def check(self, prefix: str = "scheduler") -> list[str]:
        """Problems with this config alone (relations to optimizer.lr / weight_decay and train_iters are the
        container's)."""
        problems = at_least(self, prefix, null_disables=False, lr_warmup_iters=0, lr_decay_iters=1, lr_warmup_init=0,
                            start_weight_decay=0, end_weight_decay=0)
        if self.lr_warmup_fraction is not None:
            if not 0 <= self.lr_warmup_fraction < 1:
                problems.append(f"{prefix}.lr_warmup_fraction must be in [0, 1), got {self.lr_warmup_fraction}")
            if self.lr_warmup_iters:
                problems.append(f"{prefix}.lr_warmup_iters ({self.lr_warmup_iters}) and "
                                f"{prefix}.lr_warmup_fraction ({self.lr_warmup_fraction}) are both set; "
                                "set one (the other to 0 / null)")
        if self.lr_decay_style == "WSD" and (self.lr_wsd_decay_iters is None or self.lr_wsd_decay_iters < 1):
            problems.append(f"{prefix}.lr_decay_style=WSD needs {prefix}.lr_wsd_decay_iters >= 1, got "
                            f"{self.lr_wsd_decay_iters}")
        problems += [f"{prefix}.{name}={getattr(self, name)!r} applies to lr_decay_style=WSD, not "
                     f"{self.lr_decay_style!r}; set {prefix}.lr_decay_style=WSD, or drop it" for name, default in
                     (("lr_wsd_decay_iters", None), ("lr_wsd_decay_style", "exponential"))
                     if self.lr_decay_style != "WSD" and getattr(self, name) != default]
        if self.use_checkpoint_opt_param_scheduler and self.override_opt_param_scheduler:
            problems.append(f"{prefix}.use_checkpoint_opt_param_scheduler and {prefix}.override_opt_param_scheduler "
                            "are both true; set one to false")
        return problems

    def finalize(self, train_iters: int, weight_decay: float) -> None:
        """Fill the derived values: decay iterations, warmup iterations from the fraction, weight decays."""
        if self.lr_decay_iters is None:
            self.lr_decay_iters = train_iters
        if self.lr_warmup_fraction is not None:
            self.lr_warmup_iters = int(self.lr_warmup_fraction * self.lr_decay_iters)
            self.lr_warmup_fraction = None
        if self.start_weight_decay is None:
            self.start_weight_decay = weight_decay
        if self.end_weight_decay is None:
            self.end_weight_decay = weight_decay

    def param_scheduler_kwargs(self, optimizer: MCoreOptimizerConfig, train_iters: int) -> dict[str, Any]:
        """Keyword arguments of megatron-core's ``OptimizerParamScheduler`` (all but ``optimizer``), in iterations.

        Call after :meth:`finalize`; the loop then steps the scheduler by 1 per iteration.
        """
        if self.lr_decay_iters is None or self.start_weight_decay is None or self.end_weight_decay is None:
            raise ValueError("SchedulerConfig.param_scheduler_kwargs needs a finalized config; call "
                             "ConfigContainer.finalize() first")
        return {
            "init_lr": self.lr_warmup_init,
            "max_lr": optimizer.lr,
            "min_lr": optimizer.min_lr if optimizer.min_lr is not None else 0.0,
            "lr_warmup_steps": self.lr_warmup_iters,
            "lr_decay_steps": self.lr_decay_iters,
            "lr_decay_style": self.lr_decay_style,
            "start_wd": self.start_weight_decay,
            "end_wd": self.end_weight_decay,
            "wd_incr_steps": train_iters,
            "wd_incr_style": self.weight_decay_incr_style,
            "use_checkpoint_opt_param_scheduler": self.use_checkpoint_opt_param_scheduler,
            "override_opt_param_scheduler": self.override_opt_param_scheduler,
            "wsd_decay_steps": self.lr_wsd_decay_iters,
            "lr_wsd_decay_style": self.lr_wsd_decay_style,
        }
