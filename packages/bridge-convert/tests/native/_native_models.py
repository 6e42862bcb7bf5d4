"""Tiny native / local model pairs with identical weights, for the native spec's parity tests."""

from __future__ import annotations

import torch

from bridge_convert.provider import GPTModelProvider

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
            vocab_size=128, seq_length=64, rotary_base=10000.0, make_vocab_size_divisible_by=64)


def provider(impl: str, **overrides) -> GPTModelProvider:
    return GPTModelProvider(transformer_impl=impl, **{**TINY, **overrides})


def build(impl: str, seed: int = 0, **overrides):
    """Build this rank's tiny model; the runtime must be initialised with the provider's layout."""
    p = provider(impl, **overrides)
    p.finalize()
    torch.manual_seed(seed)
    return p.provide()


def randomise_norms(model, seed: int = 7) -> None:
    """Norm weights start at ones, which would hide a swapped or skipped norm: perturb them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=g).to(param.device))


def copy_weights(src, dst) -> None:
    with torch.no_grad():
        for (name, p), (name2, q) in zip(src.named_parameters(), dst.named_parameters(), strict=True):
            assert name == name2, (name, name2)
            q.copy_(p)


def pair(seed: int = 0, **overrides):
    """(local, native) models with the same weights."""
    local = build("local", seed, **overrides)
    randomise_norms(local)
    native = build("native", seed + 1, **overrides)
    copy_weights(local, native)
    return local, native


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def max_grad_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)
