"""Helpers shared by bridge-peft's tests (a uniquely named module: conftest names clash across packages)."""

import torch

#: the families of the acceptance: Llama 3.1, Llama 3.2 (tied embeddings), Qwen3 (q/k norms), Mistral
ORACLE_FAMILIES = ("llama31", "llama32", "qwen3", "mistral")


def randomize_adapters(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every adapter tensor random non-zero values (B starts at zero, which would hide a wrong B)."""
    gen = torch.Generator().manual_seed(seed)
    chunks = model if isinstance(model, list) else [model]
    with torch.no_grad():
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if getattr(param, "bridge_adapter", False):
                    noise = torch.randn(param.shape, generator=gen).to(device=param.device, dtype=param.dtype)
                    if name.endswith("magnitude"):
                        param.mul_(1.0 + 0.3 * noise)
                    else:
                        param.copy_(scale * noise)
