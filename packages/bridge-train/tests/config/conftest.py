"""Fixtures for the config tests: a complete valid container. Nothing here builds a model or a process group."""

from __future__ import annotations

from typing import Any

import pytest
from config_stubs import FakeDoRA, FakeLoRA, MockDataConfig, tiny_provider

from bridge_train.config import ConfigContainer, OptimizerConfig, TrainConfig


@pytest.fixture
def make_cfg():
    """Factory for a complete, valid container at world size 1; keyword arguments replace sections."""

    def make(**sections: Any) -> ConfigContainer:
        values: dict[str, Any] = dict(
            model=tiny_provider(),
            train=TrainConfig(train_iters=10, micro_batch_size=2, global_batch_size=8),
            optimizer=OptimizerConfig(lr=3e-4),
            dataset=MockDataConfig(),
        )
        values.update(sections)
        return ConfigContainer(**values)

    return make


@pytest.fixture
def lora_registered(monkeypatch):
    """``lora`` and ``dora`` registered as bridge-recipes registers bridge-peft's methods (undone afterwards)."""
    from bridge_train.config import protocols

    monkeypatch.setattr(protocols, "_METHODS", dict(protocols._METHODS))
    protocols.register_peft_method("lora", FakeLoRA)
    protocols.register_peft_method("dora", FakeDoRA)
