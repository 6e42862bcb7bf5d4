"""Declarative parameter mappings between megatron-core and HF names.

A mapping relates one megatron-core parameter pattern to one or more HF tensor patterns (``*`` stands for the
layer index) and converts *full* (unsharded) tensors both ways. How a full megatron tensor is split over tensor-
parallel ranks is described by :attr:`Mapping.tp` and :attr:`Mapping.stride`, and performed by the bridge engine:

- ``auto``: read it off the megatron parameter (megatron-core marks TP-split parameters with
  ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``); everything else is replicated.
- ``column``: split dim 0; ``row``: split dim 1; ``replicated``: every rank holds the whole tensor.

``stride`` > 1 splits each of ``stride`` equal blocks separately and gives every rank its piece of each block, which
is how the fused gate/up projection of a gated MLP is laid out (rank r holds ``[gate_r; up_r]``).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

__all__ = ["DEFAULT_VOCAB_DIVISOR", "QKV", "Direct", "GatedMLP", "Mapping", "MappingContext", "VocabParallel",
           "padded_vocab_size"]

DEFAULT_VOCAB_DIVISOR = 128
"""megatron-core's default ``make_vocab_size_divisible_by`` (GPTModelProvider's too)."""


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's vocab padding: round up to a multiple of ``divisible_by x TP`` so every TP shard is equal."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple

TPKind = Literal["auto", "column", "row", "replicated"]


@dataclass(frozen=True, slots=True)
class MappingContext:
    """What a conversion needs to know beyond the tensors themselves."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    """The unpadded (HF / tokenizer) vocabulary size."""
    full_shape: tuple[int, ...] | None = None
    """Shape of the full megatron tensor being built (padded vocab rows included)."""


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


@dataclass(frozen=True)
class Mapping(ABC):
    """Base class: one megatron pattern, its HF patterns and how they convert."""

    megatron: str
    hf: tuple[str, ...]
    tp: TPKind = "auto"
    stride: int = 1
    export: bool = True
    """False for megatron parameters that only mirror another one (a tied output layer on the last PP stage)."""
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    moves_whole_rows: ClassVar[bool] = False
    """True when :meth:`to_hf` only selects and reorders whole dim-0 rows of the megatron tensor (every other
    dim kept as it is): each HF tensor is then a run of row ranges of the stored tensor, which the offline export
    copies file to file (it finds the ranges by running :meth:`to_hf` on row indices). A mapping that computes
    values or rearranges other dims leaves it False and is exported through :meth:`to_hf` itself."""

    def __post_init__(self) -> None:
        if self.megatron.count("*") > 1 or any(p.count("*") != self.megatron.count("*") for p in self.hf):
            raise ValueError(f"mapping {self.megatron!r} <-> {self.hf}: use one '*' (the layer index) on both sides")
        object.__setattr__(self, "_regex", _pattern_regex(self.megatron))

    def match(self, megatron_name: str) -> str | None:
        """The layer index matched by ``*`` ("" when the pattern has none), or None if no match."""
        m = self._regex.match(megatron_name)
        if m is None:
            return None
        return m.group(1) if m.groups() else ""

    def hf_names(self, layer: str) -> list[str]:
        return [p.replace("*", layer) for p in self.hf]

    @abstractmethod
    def to_megatron(self, hf: Sequence[torch.Tensor], ctx: MappingContext) -> torch.Tensor:
        """Full HF tensors (in ``hf`` order) -> the full megatron tensor."""

    @abstractmethod
    def to_hf(self, megatron: torch.Tensor, ctx: MappingContext) -> list[torch.Tensor]:
        """The full megatron tensor -> full HF tensors (in ``hf`` order)."""

    def to_megatron_blocks(self, hf: Sequence[torch.Tensor], ctx: MappingContext) -> list[torch.Tensor]:
        """The full megatron tensor as its ``stride`` blocks along dim 0 (what a checkpoint stores apart).

        A mapping whose blocks are its inputs overrides this to hand them over without building the fused
        tensor (the offline converter writes the blocks, so a copy of every fused weight is saved)."""
        return list(torch.chunk(self.to_megatron(hf, ctx), self.stride, dim=0))


@dataclass(frozen=True)
class Direct(Mapping):
    """One tensor on each side, identical up to TP sharding (norms, o_proj, down_proj, q/k norms, biases)."""

    moves_whole_rows = True

    def __init__(self, megatron: str, hf: str, tp: TPKind = "auto", *, export: bool = True) -> None:
        super().__init__(megatron, (hf,), tp, 1, export)

    def to_megatron(self, hf, ctx):
        return hf[0]

    def to_hf(self, megatron, ctx):
        return [megatron]


@dataclass(frozen=True)
class VocabParallel(Mapping):
    """Word embeddings and the output layer: padded to megatron's padded vocab on import, truncated on export."""

    moves_whole_rows = True

    def __init__(self, megatron: str, hf: str, *, export: bool = True) -> None:
        super().__init__(megatron, (hf,), "column", 1, export)

    def to_megatron(self, hf, ctx):
        (table,) = hf
        if table.shape[0] != ctx.vocab_size:
            raise ValueError(f"{self.hf[0]} has {table.shape[0]} rows but the config's vocab_size is {ctx.vocab_size}")
        rows = ctx.full_shape[0] if ctx.full_shape else table.shape[0]
        if rows == table.shape[0]:
            return table
        padded = table.new_zeros((rows, *table.shape[1:]))
        padded[: table.shape[0]] = table
        return padded

    def to_hf(self, megatron, ctx):
        return [megatron[: ctx.vocab_size]]


@dataclass(frozen=True)
class QKV(Mapping):
    """Separate q/k/v projections (weights or biases) <-> megatron's fused, per-query-group interleaved ``linear_qkv``.

    megatron-core lays the fused projection out group by group: for each of the ``G`` KV groups, the ``H/G``
    query heads of that group, then its key head, then its value head. Splitting dim 0 evenly over TP therefore
    hands every rank whole groups (TP must divide ``G``).
    """

    moves_whole_rows = True

    def __init__(self, megatron: str, *, q: str, k: str, v: str) -> None:
        super().__init__(megatron, (q, k, v), "column", 1, True)

    def to_megatron(self, hf, ctx):
        q, k, v = hf
        heads, groups, d = ctx.num_attention_heads, ctx.num_query_groups, ctx.head_dim
        expected = [heads * d, groups * d, groups * d]
        for name, tensor, rows in zip(self.hf, (q, k, v), expected):
            if tensor.shape[0] != rows:
                raise ValueError(f"{name}: expected {rows} rows ({rows // d} heads x head_dim {d}), "
                                 f"got shape {tuple(tensor.shape)}")
        tail = q.shape[1:]
        q = q.reshape(groups, heads // groups, d, *tail)
        k = k.reshape(groups, 1, d, *tail)
        v = v.reshape(groups, 1, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape((heads + 2 * groups) * d, *tail)

    def to_hf(self, megatron, ctx):
        heads, groups, d = ctx.num_attention_heads, ctx.num_query_groups, ctx.head_dim
        per_group = heads // groups
        tail = megatron.shape[1:]
        fused = megatron.reshape(groups, per_group + 2, d, *tail)
        q = fused[:, :per_group].reshape(heads * d, *tail)
        k = fused[:, per_group].reshape(groups * d, *tail)
        v = fused[:, per_group + 1].reshape(groups * d, *tail)
        return [q.contiguous(), k.contiguous(), v.contiguous()]


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """HF ``gate_proj`` and ``up_proj`` <-> megatron's fused ``linear_fc1`` = ``[gate; up]``, TP-split per half."""

    moves_whole_rows = True

    def __init__(self, megatron: str, *, gate: str, up: str) -> None:
        super().__init__(megatron, (gate, up), "column", 2, True)

    def to_megatron(self, hf, ctx):
        return torch.cat(self.to_megatron_blocks(hf, ctx), dim=0)

    def to_megatron_blocks(self, hf, ctx):
        gate, up = hf
        if gate.shape != up.shape:
            raise ValueError(f"{self.hf[0]} {tuple(gate.shape)} and {self.hf[1]} {tuple(up.shape)} differ in shape")
        return [gate, up]

    def to_hf(self, megatron, ctx):
        gate, up = torch.chunk(megatron, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]
