"""Sequence packing: several short sequences per ``seq_length`` row, with attention kept within each one.

Rows are filled offline (once, when the dataset is built) by first-fit-decreasing. A packed row carries
``cu_seqlens`` (segment boundaries: each document, then the trailing padding as a segment of its own) and
position ids restarting at 0 in every segment; :func:`packed_seq_params_from_batch` turns a batch of rows into
megatron-core ``PackedSeqParams`` (``thd`` format) so that attention never crosses a boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from bridge_data.samples import CU_SEQLENS_FILL, round_up, sequence_pieces, to_sample

if TYPE_CHECKING:
    from megatron.core.packed_seq_params import PackedSeqParams

logger = logging.getLogger(__name__)


def pack_sequences(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequence lengths into rows of ``seq_length``.

    Sequences are placed longest first (ties by index), each into the first row with room; a max segment tree
    over row capacities finds that row in O(log n).

    Args:
        lengths: Length of every sequence (each in ``[1, seq_length]``).
        seq_length: Capacity of a row.

    Returns:
        Rows, each a list of sequence indices (in placement order).

    Raises:
        ValueError: If a length is < 1 or > ``seq_length``.
    """
    bad = [(i, n) for i, n in enumerate(lengths) if not 1 <= n <= seq_length]
    if bad:
        raise ValueError(f"sequence lengths must be in [1, {seq_length}]; got (index, length) {bad[:5]}")
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = np.full(2 * size, -1, dtype=np.int64)
    tree[size : size + n] = seq_length  # unopened rows have full capacity and lie right of opened ones
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    rows: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


@dataclass(kw_only=True, slots=True)
class PackingStats:
    """How well sequences filled the packed rows."""

    num_sequences: int
    """Sequences packed."""

    num_rows: int
    """Rows produced."""

    seq_length: int
    """Row length."""

    num_tokens: int
    """Sequence tokens in all rows (excluding any padding)."""

    @property
    def fill_ratio(self) -> float:
        """Fraction of row positions holding sequence tokens."""
        return self.num_tokens / (self.num_rows * self.seq_length) if self.num_rows else 0.0

    def __str__(self) -> str:
        return (f"packed {self.num_sequences} sequences into {self.num_rows} rows of {self.seq_length} tokens: "
                f"fill ratio {self.fill_ratio:.1%} ({self.num_rows * self.seq_length - self.num_tokens} padding)")


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows of (ids, target mask) sequences; items follow the sample contract, with ``cu_seqlens``.

    Args:
        sequences: ``(ids int64 [L], target_mask bool [L])`` per sequence (see
            :func:`bridge_data.samples.sequence_pieces` for how labels and the loss mask follow from them).
        seq_length: Row length.
        pad_id: Id of padded positions.
        pad_to_multiple_of: Every document segment is padded to a multiple of this (e.g. ``2 * cp_size`` for
            context parallelism); ``seq_length`` must be a multiple too.

    Raises:
        ValueError: If a (padded) sequence is longer than ``seq_length`` or ``seq_length`` is not a multiple
            of ``pad_to_multiple_of``.
    """

    def __init__(self, sequences: Sequence[tuple[np.ndarray, np.ndarray]], *, seq_length: int, pad_id: int,
                 pad_to_multiple_of: int = 1) -> None:
        if seq_length % pad_to_multiple_of:
            raise ValueError(f"seq_length {seq_length} is not a multiple of pad_to_multiple_of {pad_to_multiple_of}")
        self.sequences = sequences
        self.seq_length = seq_length
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self._lengths = [round_up(len(ids), pad_to_multiple_of) for ids, _ in sequences]
        self.rows = pack_sequences(self._lengths, seq_length)
        """Sequence indices of every row."""
        self.stats = PackingStats(num_sequences=len(sequences), num_rows=len(self.rows), seq_length=seq_length,
                                  num_tokens=sum(len(ids) for ids, _ in sequences))
        """Packing statistics (also logged at INFO)."""
        logger.info("%s", self.stats)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        parts, bounds = [], [0]
        for i in self.rows[idx]:
            ids, mask = self.sequences[i]
            parts.append(sequence_pieces(ids, mask, length=self._lengths[i], pad_id=self.pad_id))
            bounds.append(bounds[-1] + self._lengths[i])
        tail = self.seq_length - bounds[-1]
        if tail:
            parts.append(sequence_pieces(np.array([self.pad_id]), np.zeros(1, dtype=bool), length=tail,
                                         pad_id=self.pad_id))
            bounds.append(self.seq_length)
        tokens, labels, loss_mask, position_ids = (np.concatenate(p) for p in zip(*parts))
        return to_sample(tokens, labels, loss_mask, position_ids, np.asarray(bounds, dtype=np.int32))


def packed_seq_params_from_batch(batch: dict[str, torch.Tensor]) -> PackedSeqParams | None:
    """megatron-core ``PackedSeqParams`` (``qkv_format="thd"``) for a collated batch of packed rows.

    The B rows are treated as one sequence of ``B * S`` tokens: each row's boundaries are offset by
    ``row * S`` and concatenated, so the model must see the tokens flattened to ``[1, B * S]`` in row order.

    Args:
        batch: A batch from :func:`bridge_data.collate_samples` (``tokens`` [B, S], ``cu_seqlens``
            [B, K] padded with -1); a single sample (``cu_seqlens`` [K]) also works.

    Returns:
        The params (int32 ``cu_seqlens_q/kv`` on the batch's device, int ``max_seqlen_q/kv``), or None when
        the batch is not packed.

    Raises:
        ValueError: If a row's boundaries do not run from 0 to S.
    """
    cu = batch.get("cu_seqlens")
    if cu is None:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    if cu.dim() == 1:
        cu = cu.unsqueeze(0)
    seq_length = batch["tokens"].shape[-1]
    pieces = []
    for row in range(cu.shape[0]):
        bounds = cu[row][cu[row] != CU_SEQLENS_FILL]
        if bounds.numel() < 2 or int(bounds[0]) != 0 or int(bounds[-1]) != seq_length:
            raise ValueError(f"cu_seqlens of row {row} must run from 0 to {seq_length}, got {bounds.tolist()}")
        pieces.append(bounds[(1 if row else 0) :] + row * seq_length)
    cu_seqlens = torch.cat(pieces).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
