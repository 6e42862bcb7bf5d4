"""Fixtures for bridge-convert's tests: a world-size-1 runtime and tiny HF checkpoints on disk."""

import pytest
import torch

from bridge_convert.runtime import initialize_parallel
from bridge_convert.testing import FAMILIES, save_tiny_hf_checkpoint


@pytest.fixture
def runtime():
    """A world-size-1 runtime (gloo on CPU) with a fixed seed, shared by the single-process tests."""
    return initialize_parallel(seed=1234)


@pytest.fixture
def tiny_hf_checkpoint(tmp_path_factory):
    """Factory: ``tiny_hf_checkpoint("qwen3", dtype=torch.bfloat16)`` -> path of a saved random tiny model."""

    def make(family: str = "llama", dtype: torch.dtype = torch.float32, **overrides) -> str:
        path = tmp_path_factory.mktemp(f"hf-{family}")
        return save_tiny_hf_checkpoint(path, family, dtype=dtype, **overrides)

    return make


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, str]:
    """One random tiny fp32 checkpoint per family (Llama 3 / 3.1 / 3.2, Qwen2, Qwen3, Mistral), 2+ shards each."""
    root = tmp_path_factory.mktemp("hf-families")
    return {family: save_tiny_hf_checkpoint(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}
