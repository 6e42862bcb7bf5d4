import logging
import random

import numpy as np
import pytest
import torch

from bridge_data.packing import PackedDataset, pack_sequences, packed_seq_params_from_batch
from bridge_data.samples import collate_samples
from bridge_data.sft import SFTDataConfig


def _reference_ffd(lengths, capacity):
    """Plain O(n * rows) first-fit-decreasing."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def test_pack_sequences_is_first_fit_decreasing():
    assert pack_sequences([5, 3, 7, 2, 4, 1], 8) == [[2, 5], [0, 1], [4, 3]]


@pytest.mark.parametrize("seed", range(5))
def test_pack_sequences_matches_reference_ffd(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 300))]
    rows = pack_sequences(lengths, 64)
    assert rows == _reference_ffd(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)


def test_pack_sequences_rejects_overlong_sequences():
    with pytest.raises(ValueError, match=r"\[1, 8\].*\(1, 9\)"):
        pack_sequences([3, 9], 8)


def _seq(ids, targets):
    return np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=bool)


def test_packed_row_has_boundaries_positions_labels_and_masks():
    sequences = [_seq([10, 11, 12], [0, 1, 1]), _seq([20, 21, 22, 23, 24], [0, 0, 1, 1, 1]), _seq([30, 31], [0, 1])]
    ds = PackedDataset(sequences, seq_length=12, pad_id=0)
    assert ds.rows == [[1, 0, 2]] and len(ds) == 1
    row = ds[0]
    assert row["cu_seqlens"].tolist() == [0, 5, 8, 10, 12] and row["cu_seqlens"].dtype == torch.int32
    assert row["tokens"].tolist() == [20, 21, 22, 23, 24, 10, 11, 12, 30, 31, 0, 0]
    assert row["labels"].tolist() == [21, 22, 23, 24, 0, 11, 12, 0, 31, 0, 0, 0]
    assert row["loss_mask"].tolist() == [0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 1]
    assert ds.stats.num_rows == 1 and ds.stats.fill_ratio == pytest.approx(10 / 12)


def test_full_row_has_no_padding_segment():
    ds = PackedDataset([_seq([1, 2, 3, 4], [0, 1, 1, 1]), _seq([5, 6, 7, 8], [0, 1, 1, 1])], seq_length=8, pad_id=0)
    assert ds[0]["cu_seqlens"].tolist() == [0, 4, 8] and ds.stats.fill_ratio == 1.0


def test_pad_to_multiple_pads_every_document():
    sequences = [_seq([1, 2, 3], [0, 1, 1]), _seq([4, 5, 6, 7, 8], [0, 1, 1, 1, 1])]
    row = PackedDataset(sequences, seq_length=16, pad_id=0, pad_to_multiple_of=4)[0]
    assert row["cu_seqlens"].tolist() == [0, 8, 12, 16]
    assert row["position_ids"].tolist() == list(range(8)) + list(range(4)) + list(range(4))
    assert row["loss_mask"][5:8].sum() == 0 and row["loss_mask"][11] == 0


def test_packed_seq_params_offset_rows_of_a_micro_batch():
    sequences = [_seq(range(1, 6), [1] * 5), _seq(range(1, 4), [1] * 3), _seq(range(1, 8), [1] * 7),
                 _seq(range(1, 3), [1] * 2)]
    ds = PackedDataset(sequences, seq_length=8, pad_id=0)
    batch = collate_samples([ds[0], ds[1]])
    assert batch["tokens"].shape == (2, 8)
    params = packed_seq_params_from_batch(batch)
    expected = torch.cat([ds[0]["cu_seqlens"], ds[1]["cu_seqlens"][1:] + 8])
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32 and torch.equal(params.cu_seqlens_q, expected)
    assert torch.equal(params.cu_seqlens_kv, expected)
    assert params.max_seqlen_q == params.max_seqlen_kv == 7
    assert int(expected[-1]) == 16


def test_packed_seq_params_for_one_sample_and_unpacked_batches():
    row = PackedDataset([_seq([1, 2, 3], [0, 1, 1])], seq_length=4, pad_id=0)[0]
    params = packed_seq_params_from_batch(row)
    assert params.cu_seqlens_q.tolist() == [0, 3, 4] and params.max_seqlen_q == 3
    assert packed_seq_params_from_batch({"tokens": torch.zeros(2, 4)}) is None


def test_packed_seq_params_reject_broken_boundaries():
    batch = {"tokens": torch.zeros(1, 8), "cu_seqlens": torch.tensor([[0, 3, 6]], dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"row 0 must run from 0 to 8"):
        packed_seq_params_from_batch(batch)


def test_packed_sft_rows_keep_each_conversation_and_log_fill_ratio(tokenizer, tmp_path, write_jsonl, caplog):
    answers = [f"answer {w}" for w in ("paris", "twelve", "the fox", "hello world", "lazy dog", "seven")]
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": a}]}
            for i, a in enumerate(answers)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="bridge_data.packing"):
        train, _, _ = SFTDataConfig(path=path, seq_length=64, packed=True).build(tokenizer)
    assert "fill ratio" in caplog.text and 0.5 < train.stats.fill_ratio <= 1.0
    assert len(train) < len(rows)
    spans = []
    for i in range(len(train)):
        row = train[i]
        cu = row["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == 64
        for start, end in zip(cu[:-1], cu[1:]):
            assert row["position_ids"][start:end].tolist() == list(range(end - start))
            assert row["loss_mask"][end - 1] == 0  # no target across a boundary
            mask = row["loss_mask"][start:end].bool()
            if mask.any():
                spans.append(tokenizer.detokenize(row["labels"][start:end][mask].tolist()))
    assert sorted(spans) == sorted(f"{a}<|end|>\n" for a in answers)
