"""The sample contract shared by every bridge-data dataset, and the collate function that batches it.

A sample is a dict of torch tensors, S being its length:

- ``tokens`` int64 [S]: input ids.
- ``labels`` int64 [S]: next-token targets, ``labels[i] == tokens[i + 1]`` within a sequence.
- ``loss_mask`` float32 [S]: 1.0 where ``labels[i]`` is trained on, 0.0 elsewhere (padding, prompts).
- ``position_ids`` int64 [S]: rotary positions; packed rows restart them at every document.
- ``cu_seqlens`` int32 [n_segments + 1] (packed rows only): segment boundaries, from 0 to S. Trailing padding
  is a segment of its own.

Batches stack these to [B, S]; ``cu_seqlens`` is stacked to [B, max_segments + 1], padded with -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""Keys every sample carries; packed samples add ``cu_seqlens``."""

CU_SEQLENS_FILL = -1
"""Fill value of ``cu_seqlens`` rows in a collated batch beyond each row's last boundary."""


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def sequence_pieces(ids: np.ndarray, target_mask: np.ndarray, *, length: int, pad_id: int):
    """Tokens, labels, loss mask and positions of one sequence, padded to ``length``.

    Args:
        ids: The sequence's ids [L], L <= length.
        target_mask: [L] bool, True where ``ids[i]`` is a token to learn (e.g. an answer token).
        length: Length to pad to.
        pad_id: Id written at padded positions of tokens and labels.

    Returns:
        ``(tokens, labels, loss_mask, position_ids)`` numpy arrays of ``length``: ``labels[i] = ids[i + 1]``
        and ``loss_mask[i] = target_mask[i + 1]``; the last real position and the padding have no target.
    """
    n = len(ids)
    assert n <= length, (n, length)
    tokens = np.full(length, pad_id, dtype=np.int64)
    labels = np.full(length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(length, dtype=np.float32)
    tokens[:n] = ids
    labels[: n - 1] = ids[1:]
    loss_mask[: n - 1] = target_mask[1:]
    return tokens, labels, loss_mask, np.arange(length, dtype=np.int64)


def to_sample(tokens: np.ndarray, labels: np.ndarray, loss_mask: np.ndarray, position_ids: np.ndarray,
              cu_seqlens: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Wrap numpy pieces as a contract sample (dtypes fixed here)."""
    sample = {
        "tokens": torch.as_tensor(tokens, dtype=torch.int64),
        "labels": torch.as_tensor(labels, dtype=torch.int64),
        "loss_mask": torch.as_tensor(loss_mask, dtype=torch.float32),
        "position_ids": torch.as_tensor(position_ids, dtype=torch.int64),
    }
    if cu_seqlens is not None:
        sample["cu_seqlens"] = torch.as_tensor(cu_seqlens, dtype=torch.int32)
    return sample


def collate_samples(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack contract samples into a batch.

    Samples of different lengths (SFT without ``pad_to_seq_length``) are right-padded to the longest:
    tokens and labels with 0, loss mask with 0, positions continuing. ``cu_seqlens`` rows are padded with
    :data:`CU_SEQLENS_FILL`; :func:`bridge_data.packed_seq_params_from_batch` strips that fill.

    Args:
        samples: Contract samples.

    Returns:
        A dict of [B, S] tensors (``cu_seqlens``: [B, max_segments + 1]).

    Raises:
        ValueError: If the batch is empty, or packed samples differ in length.
    """
    if not samples:
        raise ValueError("collate_samples got an empty batch")
    length = max(s["tokens"].shape[0] for s in samples)
    packed = "cu_seqlens" in samples[0]
    batch: dict[str, torch.Tensor] = {}
    for key in SAMPLE_KEYS:
        rows = []
        for s in samples:
            value = s[key]
            missing = length - value.shape[0]
            if missing:
                if packed:
                    raise ValueError(f"packed samples must share one length, got {value.shape[0]} and {length}")
                if key == "position_ids":
                    tail = torch.arange(value.shape[0], length, dtype=value.dtype)
                else:
                    tail = torch.zeros(missing, dtype=value.dtype)
                value = torch.cat([value, tail])
            rows.append(value)
        batch[key] = torch.stack(rows)
    if packed:
        width = max(s["cu_seqlens"].shape[0] for s in samples)
        cu = torch.full((len(samples), width), CU_SEQLENS_FILL, dtype=torch.int32)
        for row, s in enumerate(samples):
            cu[row, : s["cu_seqlens"].shape[0]] = s["cu_seqlens"]
        batch["cu_seqlens"] = cu
    return batch
