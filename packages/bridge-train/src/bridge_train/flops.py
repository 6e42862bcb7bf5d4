"""The FLOP count behind TFLOP/s and MFU: one definition for the training loop and the benchmarks (tools/bench).

FLOPs of one training iteration (forward + backward = 3 x forward), per token:

    6 * N  +  12 * L * H * S

with N the parameters that take part in matrix multiplies (every transformer-layer weight matrix plus the output
projection, V x H, whether or not it is tied to the input embedding; not the embedding lookup, biases or norm
weights, which do no matmul), L layers, H the hidden size and S the sequence length (the attention score and
value products, counted for the full S x S square as PaLM's appendix B does). V is the tokenizer's vocabulary,
not megatron's padded one: padding depends on the tensor-parallel size, and a model's FLOPs must not. MFU divides
the achieved FLOP/s per GPU by the card's dense bf16 tensor-core peak (:data:`PEAK_BF16_TFLOPS`).

Dense decoders only (every model bridge-convert maps today); a mixture-of-experts provider is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = ["PEAK_BF16_TFLOPS", "ModelShape", "flops_per_token", "peak_flops"]

PEAK_BF16_TFLOPS = MappingProxyType({
    "H100 PCIE": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
})
"""Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of the upper-cased CUDA device name; the
longest matching key wins (``NVIDIA H100 PCIe`` -> 756, ``NVIDIA H100 80GB HBM3`` (SXM) -> 989)."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The sizes of a dense GPT decoder that its FLOPs depend on."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    gated_linear_unit: bool = True

    @classmethod
    def from_provider(cls, provider: Any) -> ModelShape:
        """The shape of a ``GPTModelProvider`` (or any megatron-core TransformerConfig with a ``vocab_size``).

        Raises:
            ValueError: for a mixture-of-experts model or a provider without a vocabulary size.
        """
        if getattr(provider, "num_moe_experts", None):
            raise ValueError("the FLOP count covers dense models only; num_moe_experts="
                             f"{provider.num_moe_experts} would need the routed experts counted")
        if not getattr(provider, "vocab_size", None):
            raise ValueError("the FLOP count needs the model's vocab_size; set model.vocab_size or a tokenizer")
        h, heads = provider.hidden_size, provider.num_attention_heads
        return cls(num_layers=provider.num_layers, hidden_size=h, num_attention_heads=heads,
                   num_query_groups=provider.num_query_groups or heads, kv_channels=provider.kv_channels or h // heads,
                   ffn_hidden_size=provider.ffn_hidden_size or 4 * h, vocab_size=provider.vocab_size,
                   gated_linear_unit=bool(provider.gated_linear_unit))

    def matmul_parameters(self) -> int:
        """N of the module docstring: QKV, attention output, MLP matrices of every layer, and the output layer."""
        h, kv = self.hidden_size, self.kv_channels
        attention = h * (self.num_attention_heads + 2 * self.num_query_groups) * kv + self.num_attention_heads * kv * h
        mlp = (3 if self.gated_linear_unit else 2) * h * self.ffn_hidden_size
        return self.num_layers * (attention + mlp) + self.vocab_size * h

    def training_flops_per_token(self, seq_length: int) -> float:
        """``6 N + 12 L H S``: forward and backward FLOPs per trained token at ``seq_length``."""
        return 6.0 * self.matmul_parameters() + 12.0 * self.num_layers * self.hidden_size * seq_length


def flops_per_token(provider: Any, seq_length: int) -> float:
    """Training FLOPs per token of ``provider``'s model at ``seq_length`` (see the module docstring)."""
    return ModelShape.from_provider(provider).training_flops_per_token(seq_length)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the CUDA device called ``device_name``, or None for a card not listed."""
    name = device_name.upper()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None
