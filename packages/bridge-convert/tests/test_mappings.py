"""Mapping kinds against independent references (explicit per-group loops, not the code under test)."""

import pytest
import torch

from bridge_convert.mappings import QKV, Direct, GatedMLP, MappingContext, VocabParallel
from bridge_convert.model_bridge import shard, unshard


def _ctx(heads=8, groups=2, head_dim=4, hidden=32, vocab=10, full_shape=None):
    return MappingContext(heads, groups, head_dim, hidden, vocab, full_shape)


@pytest.mark.parametrize("heads,groups", [(8, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
def test_qkv_layout_is_group_major(heads, groups):
    d, hidden = 4, 24
    q, k, v = torch.randn(heads * d, hidden), torch.randn(groups * d, hidden), torch.randn(groups * d, hidden)
    fused = QKV("a.*.qkv", q="q.*", k="k.*", v="v.*").to_megatron([q, k, v], _ctx(heads, groups, d, hidden))
    rows = []
    per = heads // groups
    for g in range(groups):  # reference layout written out by hand
        rows += [q[(g * per + h) * d:(g * per + h + 1) * d] for h in range(per)]
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    assert torch.equal(fused, torch.cat(rows))


def test_qkv_roundtrip_with_gqa_and_bias():
    m = QKV("a.*.qkv", q="q.*", k="k.*", v="v.*")
    for tail in [(32,), ()]:  # weight, bias
        q, k, v = torch.randn(32, *tail), torch.randn(8, *tail), torch.randn(8, *tail)
        back = m.to_hf(m.to_megatron([q, k, v], _ctx()), _ctx())
        assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


def test_qkv_rejects_wrong_head_count():
    with pytest.raises(ValueError, match=r"k\.\*: expected 8 rows"):
        QKV("a.*.qkv", q="q.*", k="k.*", v="v.*").to_megatron(
            [torch.randn(32, 32), torch.randn(12, 32), torch.randn(8, 32)], _ctx())


def test_qkv_tp_shards_hold_whole_groups():
    heads, groups, d = 8, 4, 2
    q, k, v = torch.randn(heads * d, 6), torch.randn(groups * d, 6), torch.randn(groups * d, 6)
    ctx = _ctx(heads, groups, d, 6)
    fused = QKV("x", q="q", k="k", v="v").to_megatron([q, k, v], ctx)
    rank1 = shard(fused, (0, 1), 1, 2)
    # rank 1 of TP=2 holds groups 2 and 3: their queries (heads 4..7), keys and values.
    expected = QKV("x", q="q", k="k", v="v").to_megatron([q[8:], k[4:], v[4:]], _ctx(4, 2, d, 6))
    assert torch.equal(rank1, expected)


def test_gated_mlp_shards_are_gate_up_pairs_per_rank():
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    m = GatedMLP("fc1", gate="g", up="u")
    fused = m.to_megatron([gate, up], _ctx())
    for rank in range(2):
        local = shard(fused, (0, m.stride), rank, 2)
        assert torch.equal(local, torch.cat([gate[rank * 4:(rank + 1) * 4], up[rank * 4:(rank + 1) * 4]]))
    assert all(torch.equal(a, b) for a, b in zip(m.to_hf(fused, _ctx()), [gate, up]))


def test_blocks_are_the_gate_and_up_tensors_and_the_fused_weight_split():
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    m = GatedMLP("fc1", gate="g", up="u")
    blocks = m.to_megatron_blocks([gate, up], _ctx())
    assert blocks[0] is gate and blocks[1] is up  # handed over, not copied
    with pytest.raises(ValueError, match="differ in shape"):
        m.to_megatron_blocks([gate, up[:4]], _ctx())
    q, k, v = torch.randn(32, 5), torch.randn(8, 5), torch.randn(8, 5)
    qkv = QKV("qkv", q="q", k="k", v="v")
    (block,) = qkv.to_megatron_blocks([q, k, v], _ctx())
    assert torch.equal(block, qkv.to_megatron([q, k, v], _ctx()))


@pytest.mark.parametrize("split", [(0, 1), (1, 1), (0, 2)])
def test_unshard_inverts_shard(split):
    full = torch.randn(8, 12)
    pieces = [shard(full, split, r, 4 if split[1] == 1 else 2) for r in range(4 if split[1] == 1 else 2)]
    assert torch.equal(unshard(pieces, split), full)


def test_vocab_is_padded_on_import_and_truncated_on_export():
    table = torch.randn(10, 4)
    m = VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight")
    padded = m.to_megatron([table], _ctx(full_shape=(16, 4)))
    assert padded.shape == (16, 4) and torch.equal(padded[:10], table) and not padded[10:].any()
    assert torch.equal(m.to_hf(padded, _ctx())[0], table)


def test_vocab_rejects_table_of_other_size():
    with pytest.raises(ValueError, match="has 12 rows but the config's vocab_size is 10"):
        VocabParallel("e", "model.embed_tokens.weight").to_megatron([torch.randn(12, 4)], _ctx())


def test_patterns_match_layer_index_and_reject_mismatched_wildcards():
    m = Direct("decoder.layers.*.mlp.linear_fc2.weight", "model.layers.*.mlp.down_proj.weight")
    assert m.match("decoder.layers.17.mlp.linear_fc2.weight") == "17"
    assert m.match("decoder.layers.17.mlp.linear_fc1.weight") is None
    assert m.hf_names("17") == ["model.layers.17.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="use one"):
        Direct("decoder.layers.*.x", "model.norm.weight")
