"""Fixtures for the training tests: a tiny imported Llama and a factory for small, fast run configs."""

from __future__ import annotations

import pytest
from train_helpers import make_run_config

from bridge_convert.testing import save_tiny_hf_checkpoint


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random tiny HF Llama (2 layers, hidden 64, vocab 128, fp32) saved with save_pretrained."""
    return save_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=7)


@pytest.fixture
def run_config(tiny_llama):
    """``run_config(**{"train.train_iters": 10, ...})`` -> a fresh ConfigContainer for one run."""
    return lambda **changes: make_run_config(tiny_llama, **changes)


@pytest.fixture
def runtime():
    """A world-size-1 runtime (gloo on CPU, NCCL on a GPU) with a fixed seed (the optimizer-step tests)."""
    from bridge_convert.runtime import initialize_parallel

    return initialize_parallel(seed=1234)
