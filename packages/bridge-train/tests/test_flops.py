"""The FLOP count against torch's own FLOP counter on a real megatron-core model, and the peak table's lookups."""

import pytest
import torch

from bridge_train.flops import ModelShape, flops_per_token, peak_flops


def test_flops_per_token_matches_torch_flop_counter_on_a_training_step():
    """torch's FlopCounterMode counts every matmul of one forward + backward of megatron-core's local spec (full
    S x S attention scores); that is 6 N + 12 L H S with N over the padded output layer megatron computes. Our
    count uses the unpadded vocabulary: exactly the padding rows' 6 x (V_padded - V) x H less."""
    from torch.utils.flop_counter import FlopCounterMode

    from bridge_convert.provider import GPTModelProvider
    from bridge_convert.runtime import initialize_parallel

    initialize_parallel(seed=3)
    seq, batch = 32, 2
    provider = GPTModelProvider(transformer_impl="local", num_layers=2, hidden_size=64, num_attention_heads=4,
                                num_query_groups=2, ffn_hidden_size=96, vocab_size=100, seq_length=seq,
                                make_vocab_size_divisible_by=64, share_embeddings_and_output_weights=True)
    provider.finalize()
    model = provider.provide()
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        loss = model(ids, torch.arange(seq).expand(batch, seq), None, labels=ids)
        loss.float().mean().backward()
    measured = counter.get_total_flops() / (batch * seq)

    padding = provider.padded_vocab_size - provider.vocab_size
    assert padding == 28
    assert flops_per_token(provider, seq) == measured - 6 * padding * provider.hidden_size
    # the parameter count itself: every 2-D weight of the model (the tied embedding is the output layer)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert ModelShape.from_provider(provider).matmul_parameters() == matrices - padding * provider.hidden_size


def test_untied_output_layer_and_non_gated_mlp_are_counted():
    shape = ModelShape(num_layers=3, hidden_size=8, num_attention_heads=2, num_query_groups=1, kv_channels=4,
                       ffn_hidden_size=16, vocab_size=10, gated_linear_unit=False)
    qkv, proj, mlp = 8 * (2 + 2) * 4, 2 * 4 * 8, 2 * 8 * 16
    assert shape.matmul_parameters() == 3 * (qkv + proj + mlp) + 10 * 8
    assert shape.training_flops_per_token(5) == 6 * shape.matmul_parameters() + 12 * 3 * 8 * 5


def test_mixture_of_experts_is_refused():
    class Moe:
        num_moe_experts, vocab_size = 8, 100

    with pytest.raises(ValueError, match="dense models only; num_moe_experts=8"):
        ModelShape.from_provider(Moe())


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_lookup_prefers_the_most_specific_card_name(name, tflops):
    assert peak_flops(name) == (tflops * 1e12 if tflops else None)
