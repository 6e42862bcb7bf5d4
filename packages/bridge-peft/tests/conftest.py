"""Fixtures for bridge-peft's tests: a world-size-1 runtime, tiny HF checkpoints, adapter randomisation."""

import pytest
import torch

from bridge_convert.runtime import initialize_parallel
from bridge_convert.testing import save_tiny_hf_checkpoint

#: the families of the acceptance: Llama 3.1, Llama 3.2 (tied embeddings), Qwen3 (q/k norms), Mistral
ORACLE_FAMILIES = ("llama31", "llama32", "qwen3", "mistral")


@pytest.fixture(scope="session")
def runtime():
    return initialize_parallel(seed=1234)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf-families")
    return {family: save_tiny_hf_checkpoint(root / family, family, seed=i)
            for i, family in enumerate(ORACLE_FAMILIES)}


def randomize_adapters(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every adapter tensor random non-zero values (B starts at zero, which would hide a wrong B)."""
    gen = torch.Generator().manual_seed(seed)
    chunks = model if isinstance(model, list) else [model]
    with torch.no_grad():
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if getattr(param, "bridge_adapter", False):
                    noise = torch.randn(param.shape, generator=gen).to(param.dtype)
                    if name.endswith("magnitude"):
                        param.mul_(1.0 + 0.3 * noise)
                    else:
                        param.copy_(scale * noise)
