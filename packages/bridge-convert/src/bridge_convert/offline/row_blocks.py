"""HF tensors as row ranges of stored megatron chunks and back: what lets a conversion copy them file to file.

Most mappings only pick and reorder whole rows of the megatron tensor: the QKV interleave (each query group's
query, key and value rows are contiguous in ``linear_qkv``), the gate / up halves of a gated MLP, the vocab rows
of an embedding, and the identity. For those (:attr:`~bridge_convert.mappings.Mapping.moves_whole_rows`) every
HF tensor is a sequence of row ranges of the stored tensor, and a range of rows of a stored chunk is a contiguous
byte range of its data file. The ranges are found by running the mapping's own ``to_hf`` on a column of row
numbers, so the layout rules live in the mapping table alone, for any head count, query groups, head dim, vocab
padding, and for chunks split by rows (a checkpoint saved at TP > 1). Import goes the other way: each megatron
chunk is a sequence of row ranges of the HF tensors (``to_megatron`` run on row numbers), written block by block.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from .layout import CheckpointEntry

__all__ = ["hf_row_runs", "megatron_row_sources", "row_blocks", "source_blocks"]

Runs = list[tuple[int, int]]


def hf_row_runs(entry: CheckpointEntry, cfg: SimpleNamespace, megatron_shape: tuple[int, ...]) -> list[Runs] | None:
    """For each HF tensor of ``entry`` (in ``hf`` order), the megatron row ranges ``[start, stop)`` whose
    concatenation is it; None when the mapping does more than move whole rows (export it through ``to_hf``)."""
    if not entry.mapping.moves_whole_rows or not megatron_shape:
        return None
    rows = megatron_shape[0]
    probe = torch.arange(rows, dtype=torch.int64).reshape((rows,) + (1,) * (len(megatron_shape) - 1))
    outs = entry.mapping.to_hf(probe, entry.context(cfg, megatron_shape=tuple(megatron_shape)))
    if any(tuple(out.shape[1:]) != tuple(probe.shape[1:]) for out in outs):
        return None  # the mapping reshaped more than rows: its declaration does not hold for this tensor
    return [_runs(out.reshape(-1).numpy()) for out in outs]


def _runs(rows: np.ndarray) -> Runs:
    """The maximal ranges of consecutive numbers in ``rows``, in order."""
    if not len(rows):
        return []
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    firsts = np.concatenate(([0], cuts))
    lasts = np.concatenate((cuts, [len(rows)])) - 1
    return [(int(rows[f]), int(rows[last]) + 1) for f, last in zip(firsts, lasts)]


def row_blocks(runs: list[Runs], pieces: list[tuple[tuple[int, ...], torch.Tensor]], region: tuple[int, ...],
               layered: bool) -> list[list[torch.Tensor]] | None:
    """Each HF tensor as views of the stored ``pieces`` of a region (from
    :meth:`~bridge_convert.offline.dist_ckpt.DistCheckpointReader.region_pieces`): blocks of whole rows whose
    concatenation is the tensor, each contiguous in its piece (so mapped pieces go out file to file).

    Returns:
        the blocks per HF tensor, or None when a piece does not hold whole rows of the region (a chunk split along
        another dim, as a row-parallel weight saved at TP > 1): the caller assembles the region instead.
    """
    row_dim = 1 if layered else 0
    spans = []
    for offsets, piece in pieces:
        if any(offsets[d] or piece.shape[d] != region[d] for d in range(len(region)) if d != row_dim):
            return None
        spans.append((offsets[row_dim], piece[0] if layered else piece))
    spans.sort(key=lambda span: span[0])
    out = []
    for tensor_runs in runs:
        blocks = []
        for start, stop in tensor_runs:
            for first, rows in spans:
                low, high = max(start, first), min(stop, first + rows.shape[0])
                if low < high:
                    blocks.append(rows[low - first:high - first])
        out.append(blocks)
    return out


def megatron_row_sources(entry: CheckpointEntry, cfg: SimpleNamespace, hf_shapes: list[tuple[int, ...]]
                         ) -> tuple[np.ndarray, np.ndarray] | None:
    """For each row of the megatron tensor ``entry`` makes of HF tensors of ``hf_shapes``: which HF tensor (its
    index) and which of its rows it is, by running the mapping's ``to_megatron`` on row numbers. None when the
    mapping does more than move whole rows, or makes a row of no HF row (vocab padding: zeros).
    """
    if not entry.mapping.moves_whole_rows or any(not shape for shape in hf_shapes):
        return None
    probes, first = [], 1  # numbered from 1: a padding row comes out 0
    for shape in hf_shapes:
        probes.append(torch.arange(first, first + shape[0], dtype=torch.int64).reshape(
            (shape[0],) + (1,) * (len(shape) - 1)))
        first += shape[0]
    out = entry.mapping.to_megatron(probes, entry.context(cfg, hf_shapes))
    if any(len(shape) != out.dim() for shape in hf_shapes) or tuple(out.shape[1:]) != tuple(probes[0].shape[1:]):
        return None
    ids = out.reshape(-1).numpy() - 1
    if (ids < 0).any():
        return None
    starts = np.cumsum([0] + [shape[0] for shape in hf_shapes])
    tensor = np.searchsorted(starts, ids, side="right") - 1
    return tensor, ids - starts[tensor]


def source_blocks(sources: tuple[np.ndarray, np.ndarray], rows: slice, tensors: list[torch.Tensor]
                  ) -> list[torch.Tensor]:
    """Megatron rows ``rows`` (see :func:`megatron_row_sources`) as blocks of whole rows of the HF ``tensors``,
    in order (consecutive rows of one tensor form one block)."""
    which, row = sources[0][rows], sources[1][rows]
    if not len(row):
        return []
    cuts = np.flatnonzero((np.diff(row) != 1) | (np.diff(which) != 0)) + 1
    firsts = np.concatenate(([0], cuts))
    lasts = np.concatenate((cuts, [len(row)]))
    return [tensors[which[f]][int(row[f]):int(row[f]) + (last - f)] for f, last in zip(firsts, lasts)]
