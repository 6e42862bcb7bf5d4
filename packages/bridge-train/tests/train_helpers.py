"""Helpers shared by the training tests (a module of its own: `conftest` is not a unique module name when
several packages' tests run in one pytest process)."""

from __future__ import annotations

from typing import Any


def make_run_config(hf_path: str, load_weights: bool = True, **changes: Any):
    """A pretraining config on mock data from ``hf_path``'s weights (its config alone without ``load_weights``);
    ``changes`` are dotted overrides."""
    from bridge_convert import AutoBridge
    from bridge_data import PretrainDataConfig
    from bridge_train import (
        ConfigContainer,
        LoggerConfig,
        OptimizerConfig,
        SchedulerConfig,
        TrainConfig,
        apply_overrides,
    )

    provider = AutoBridge.from_hf_pretrained(hf_path).to_megatron_provider(load_weights=load_weights)
    provider.make_vocab_size_divisible_by = 64  # the same padded vocab (128) at TP=1 and TP=2
    cfg = ConfigContainer(
        model=provider,
        train=TrainConfig(train_iters=30, micro_batch_size=2, global_batch_size=8),
        dataset=PretrainDataConfig(seq_length=32, mock=True, seed=3),
        optimizer=OptimizerConfig(lr=3e-3, min_lr=3e-4, clip_grad=1.0, weight_decay=0.01),
        scheduler=SchedulerConfig(lr_warmup_iters=3, lr_decay_style="cosine"),
        logger=LoggerConfig(log_interval=5, print_config=False, progress_bar=False),
    )
    apply_overrides(cfg, [f"{k}={v}" for k, v in changes.items()])
    return cfg
