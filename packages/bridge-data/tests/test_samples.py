import numpy as np
import pytest
import torch

from bridge_data.samples import collate_samples, sequence_pieces, to_sample


def test_sequence_pieces_shift_labels_and_mask():
    ids = np.array([10, 11, 12, 13])
    mask = np.array([False, False, True, True])
    tokens, labels, loss_mask, positions = sequence_pieces(ids, mask, length=6, pad_id=0)
    assert tokens.tolist() == [10, 11, 12, 13, 0, 0]
    assert labels.tolist() == [11, 12, 13, 0, 0, 0]
    assert loss_mask.tolist() == [0, 1, 1, 0, 0, 0]
    assert positions.tolist() == list(range(6))


def _sample(n, value):
    return to_sample(np.full(n, value), np.full(n, value), np.ones(n), np.arange(n))


def test_collate_stacks_and_pads_to_the_longest():
    batch = collate_samples([_sample(4, 5), _sample(2, 6)])
    assert batch["tokens"].tolist() == [[5, 5, 5, 5], [6, 6, 0, 0]]
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32


def test_collate_pads_cu_seqlens_with_fill():
    a = to_sample(np.zeros(4), np.zeros(4), np.ones(4), np.arange(4), np.array([0, 1, 4]))
    b = to_sample(np.zeros(4), np.zeros(4), np.ones(4), np.arange(4), np.array([0, 4]))
    batch = collate_samples([a, b])
    assert batch["cu_seqlens"].tolist() == [[0, 1, 4], [0, 4, -1]]
    assert batch["cu_seqlens"].dtype == torch.int32


def test_collate_rejects_packed_rows_of_different_lengths():
    a = to_sample(np.zeros(4), np.zeros(4), np.ones(4), np.arange(4), np.array([0, 4]))
    b = to_sample(np.zeros(2), np.zeros(2), np.ones(2), np.arange(2), np.array([0, 2]))
    with pytest.raises(ValueError, match="one length"):
        collate_samples([a, b])
