"""The LoRA / DoRA adapter of one linear layer, fused or canonical, tensor-parallel aware.

An adapter has one or more *branches* (``A [dim, in]``, ``B [out_p, dim]``, for DoRA a magnitude ``m [out_p]``):

- a fused adapter has one branch ``all`` over the whole (possibly fused) output of the layer, e.g. one A and one
  B for ``linear_qkv``; B is laid out and TP-split exactly like the layer's weight;
- a canonical adapter has one branch per projection of a fused layer (``q`` / ``k`` / ``v`` on ``linear_qkv``,
  ``gate`` / ``up`` on ``linear_fc1``); the branch outputs are interleaved into the layer's fused layout.

Tensor parallelism (the layer's own split decides):

- column-parallel layer (weight split on the output dim): A is replicated (or split on the rank dim with
  ``split_a_on_rank``), B and m are split on the output dim like the weight. The input is replicated (gathered
  from the sequence-parallel region first), so the gradient of ``A x`` is all-reduced over TP;
- row-parallel layer (weight split on the input dim): A is split on the input dim, ``A x`` is all-reduced,
  B and m are replicated; with sequence parallelism the adapter output is scattered over the sequence like the
  layer's reduce-scattered output. The DoRA weight norm ``||W + s BA||`` per output row sums its squares over TP.

Every full tensor (A, B, m) is initialised from a generator seeded by the PEFT seed and the layer's *global* name
and then sliced, so a model gets the same adapters at any TP / PP layout.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .linear import AdapterModule, LinearInfo

__all__ = ["FusedLayout", "LoRAAdapter", "LoRABranch", "fused_layout", "real_out_rows"]


@dataclass(frozen=True)
class FusedLayout:
    """How a layer's local output rows are made of projections (``none``: a single projection)."""

    kind: str
    """``qkv``, ``gate_up`` or ``none``."""
    groups: int = 1
    """qkv: local KV groups; each holds ``per_group`` query heads, then one key and one value head."""
    per_group: int = 1
    head_dim: int = 1
    ffn: int = 0
    """gate_up: local rows of each of gate and up."""

    @property
    def projections(self) -> tuple[str, ...]:
        return {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}.get(self.kind, ())

    def local_rows(self, projection: str) -> int:
        if self.kind == "qkv":
            return self.groups * self.head_dim * (self.per_group if projection == "q" else 1)
        return self.ffn

    def fuse(self, parts: dict[str, torch.Tensor], default: torch.Tensor) -> torch.Tensor:
        """Interleave per-projection tensors (last dim) into the fused layout; missing ones come from ``default``
        (a tensor in the fused layout)."""
        parts = {**self.split(default), **parts}
        lead = default.shape[:-1]
        if self.kind == "qkv":
            g, d = self.groups, self.head_dim
            pieces = [parts["q"].reshape(*lead, g, self.per_group * d), parts["k"].reshape(*lead, g, d),
                      parts["v"].reshape(*lead, g, d)]
            return torch.cat(pieces, dim=-1).reshape(default.shape)
        return torch.cat([parts["gate"], parts["up"]], dim=-1)

    def split(self, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`fuse`: the per-projection pieces (last dim) of a fused-layout tensor."""
        lead = fused.shape[:-1]
        if self.kind == "qkv":
            g, p, d = self.groups, self.per_group, self.head_dim
            view = fused.reshape(*lead, g, (p + 2) * d)
            return {"q": view[..., : p * d].reshape(*lead, g * p * d),
                    "k": view[..., p * d: (p + 1) * d].reshape(*lead, g * d),
                    "v": view[..., (p + 1) * d:].reshape(*lead, g * d)}
        gate, up = torch.chunk(fused, 2, dim=-1)
        return {"gate": gate, "up": up}


def fused_layout(module: nn.Module, name: str, info: LinearInfo) -> FusedLayout:
    """The layout of ``module``'s output: ``qkv`` for ``linear_qkv``, ``gate_up`` for a gated ``linear_fc1``."""
    config = getattr(module, "config", None)
    leaf = name.rsplit(".", 1)[-1]
    if config is None or info.parallel != "column":
        return FusedLayout("none")
    if leaf == "linear_qkv":
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        head_dim = config.kv_channels or config.hidden_size // heads
        local_groups = groups // info.tp_size
        if local_groups * (heads // groups + 2) * head_dim != info.out_features:
            return FusedLayout("none")
        return FusedLayout("qkv", groups=local_groups, per_group=heads // groups, head_dim=head_dim)
    if leaf == "linear_fc1" and getattr(config, "gated_linear_unit", False):
        return FusedLayout("gate_up", ffn=info.out_features // 2)
    return FusedLayout("none")


def real_out_rows(module: nn.Module, name: str, info: LinearInfo) -> int:
    """The output rows of ``module`` that are real model outputs: for ``output_layer`` of a model built by a
    bridge-convert provider, the unpadded vocabulary (megatron pads it to a multiple of ``divisible_by x TP``);
    else all of them."""
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    if name.rsplit(".", 1)[-1] == "output_layer" and info.parallel == "column" and isinstance(vocab, int) \
            and 0 < vocab < info.full_out:
        return vocab
    return info.full_out


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def init_tensor(shape: tuple[int, ...], method: str, generator: torch.Generator) -> torch.Tensor:
    """A full fp32 tensor initialised by ``method`` (``zero``, ``xavier``, ``kaiming``, ``normal``)."""
    out = torch.empty(shape, dtype=torch.float32)
    if method == "zero":
        return out.zero_()
    if method == "xavier":
        fan_out, fan_in = shape[0], shape[1]
        return out.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
    if method == "kaiming":  # torch.nn.Linear's (and HF peft's) default: kaiming_uniform_(a=sqrt(5))
        bound = 1.0 / math.sqrt(shape[1])
        return out.uniform_(-bound, bound, generator=generator)
    if method == "normal":
        return out.normal_(0.0, 0.02, generator=generator)
    raise ValueError(f"unknown init method {method!r}; use one of zero, xavier, kaiming, normal")


def _shard(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    from bridge_convert.model_bridge import shard

    return shard(full, (dim, stride) if size > 1 else None, rank, size).contiguous()


class LoRABranch(nn.Module):
    """One A / B pair (and DoRA magnitude) of an adapter."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor | None) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(lora_a)
        self.lora_b = nn.Parameter(lora_b)
        self.magnitude = nn.Parameter(magnitude) if magnitude is not None else None

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(A, B, m)``. The adapter calls each branch before using its tensors: a module's forward pre-hooks
        are where megatron-core's DDP waits for the overlapped all-gather of that module's parameters
        (``overlap_param_gather`` with the distributed optimizer); reading them without a call got stale shards."""
        return self.lora_a, self.lora_b, self.magnitude


def _mark(param: nn.Parameter, split: tuple[int, int] | None) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if split is not None:
        set_tensor_model_parallel_attributes(param, True, split[0], split[1])


class LoRAAdapter(AdapterModule):
    """LoRA / DoRA on one linear layer; see the module docstring.

    Args:
        info: the layer's TP layout.
        layout: its fused output layout.
        projections: ``("all",)`` for a fused adapter, else the canonical branches to create.
        name: the layer's global name (seeds the initialisation).
        dim, alpha: rank and scale numerator (scale ``alpha / dim``).
        dropout, dropout_position: dropout on the adapter input (``pre``) or output (``post``).
        a_init, b_init: init methods of A and B.
        dtype: parameter dtype (None: the base weight's).
        dora: add the DoRA magnitude (initialised to ``||W + s BA||``, with ``weight``).
        split_a_on_rank: column-parallel layers: split A on the rank dim instead of replicating it.
        seed: init seed.
        real_rows: of a fused adapter's B, the rows drawn by ``b_init`` (:func:`real_out_rows`); the rest (the
            padded vocabulary of ``output_layer``) start at zero, so the adapter is the same at every TP size.
    """

    def __init__(self, info: LinearInfo, layout: FusedLayout, projections: tuple[str, ...], *, name: str,
                 weight: torch.Tensor, dim: int, alpha: float, dropout: float, dropout_position: str,
                 a_init: str, b_init: str, dtype: torch.dtype | None, dora: bool, split_a_on_rank: bool,
                 seed: int, real_rows: int | None = None) -> None:
        super().__init__(info)
        self.layout = layout
        self.dim = dim
        self.scale = alpha / dim
        self.dora = dora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_position = dropout_position
        self.split_a = bool(split_a_on_rank and info.parallel == "column" and info.tp_size > 1)
        if self.split_a and dim % info.tp_size:
            raise ValueError(f"{name}: split_a_on_rank needs dim ({dim}) divisible by the tensor-parallel size "
                             f"({info.tp_size}); pick a dim that is a multiple of {info.tp_size}")
        if dora and info.gather_output:
            raise ValueError(f"{name}: DoRA on a column-parallel layer with gather_output is not supported")
        dtype = dtype or weight.dtype
        device = weight.device
        rank, size = info.tp_rank, info.tp_size
        self.branches = nn.ModuleDict()
        for proj in projections:
            gen = _generator(seed, f"{name}:{proj}")
            a_full = init_tensor((dim, info.full_in), a_init, gen)
            if proj == "all":
                drawn = min(real_rows or info.full_out, info.full_out)
                b_full = torch.zeros(info.full_out, dim)
                b_full[:drawn] = init_tensor((drawn, dim), b_init, gen)
            else:
                b_full = init_tensor((layout.local_rows(proj) * size, dim), b_init, gen)
            if info.parallel == "column":
                a_split = (0, 1) if self.split_a else None
                b_split = (0, info.weight_stride if proj == "all" else 1) if size > 1 else None
            else:
                a_split = (1, 1) if size > 1 else None
                b_split = None
            a = _shard(a_full, *(a_split or (0, 1)), rank, size) if a_split else a_full
            b = _shard(b_full, *b_split, rank, size) if b_split else b_full
            branch = LoRABranch(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype),
                                torch.zeros(b.shape[0], device=device, dtype=dtype) if dora else None)
            _mark(branch.lora_a, a_split)
            _mark(branch.lora_b, b_split)
            if dora:
                _mark(branch.magnitude, b_split)
            self.branches[proj] = branch
        if dora:
            self.reset_magnitude(weight)

    # ---------------------------------------------------------------------------------- pieces
    @property
    def fused(self) -> bool:
        return "all" in self.branches

    def _tp(self) -> bool:
        return self.info.tp_size > 1

    def _row_norm(self, weight: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
        """``||W + delta||`` per output row, computed in ``dtype`` (returned in fp32), summed over TP where the
        input dim is split."""
        import torch.distributed as dist

        full = weight.detach().to(dtype) + delta.detach().to(dtype)
        sq = (full * full).sum(dim=1)
        if self.info.parallel == "row" and self._tp():
            dist.all_reduce(sq, group=self.info.tp_group)
        return sq.sqrt().float()

    def _to_fused(self, parts: dict[str, torch.Tensor], default: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return parts["all"]
        return self.layout.fuse(parts, default)

    def _full_a(self, branch: LoRABranch) -> torch.Tensor:
        """A as this rank multiplies with: gathered over the rank dim when ``split_a``."""
        if not self.split_a:
            return branch.lora_a
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        return gather_from_tensor_model_parallel_region(branch.lora_a.t(), group=self.info.tp_group).t()

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in the layer's local weight layout ``[out_local, in_local]``, in fp32 whatever the adapter
        dtype (a bf16 product would round every element of the merged weight, and the DoRA norm, once more)."""
        parts = {p: (b.lora_b.float() @ self._full_a(b).float()).t() for p, b in self.branches.items()}
        zeros = torch.zeros(self.info.in_features, self.info.out_features, dtype=torch.float32,
                            device=self.branches[next(iter(self.branches))].lora_b.device)
        return (self._to_fused(parts, zeros).t() * self.scale).contiguous()

    def dora_factor(self, weight: torch.Tensor) -> torch.Tensor:
        """``m / ||W + s BA||`` per local output row (1 for rows no branch adapts); the norm is detached.

        A row with ``W + s BA = 0`` (megatron's padded vocabulary rows of ``output_layer``) gets 1: its output is 0
        whatever the factor, and ``m / 0`` made the whole loss NaN."""
        norm = self._row_norm(weight, self.delta_weight())
        magnitude = self._to_fused({p: b.magnitude.float() for p, b in self.branches.items()}, norm)
        nonzero = norm > 0
        return torch.where(nonzero, magnitude / torch.where(nonzero, norm, 1.0), 1.0)

    @torch.no_grad()
    def reset_magnitude(self, weight: torch.Tensor) -> None:
        """DoRA's init: m = ``||W + s BA||`` (the adapter then starts as the identity, as in HF peft). Summed in
        fp64, so that the fp32 result does not depend on how TP splits the sum (a fresh adapter exports alike)."""
        norm = self._row_norm(weight, self.delta_weight(), torch.float64)
        pieces = {"all": norm} if self.fused else self.layout.split(norm)
        for p, branch in self.branches.items():
            branch.magnitude.copy_(pieces[p].to(branch.magnitude.dtype))

    # -------------------------------------------------------------------------------- forward
    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        group = self.info.tp_group
        parts = {}
        for p, branch in self.branches.items():
            if self.split_a:
                # each rank holds part of dL/dx: all-reduce it (with sequence parallelism the input gather's
                # reduce-scatter does)
                xin = x if self.info.sequence_parallel else mappings.copy_to_tensor_model_parallel_region(
                    x, group=group)
                h = F.linear(xin, branch.lora_a)
                h = mappings.gather_from_tensor_model_parallel_region(h, group=group)
                h = mappings.copy_to_tensor_model_parallel_region(h, group=group)
            else:
                h = F.linear(x, branch.lora_a)
                if self._tp():
                    h = (mappings.copy_to_tensor_model_parallel_region(h, group=group)
                         if self.info.parallel == "column"
                         else mappings.reduce_from_tensor_model_parallel_region(h, group=group))
            parts[p] = F.linear(h, branch.lora_b)
        if self.fused:
            return parts["all"]
        lead = x.shape[:-1]
        zeros = x.new_zeros(*lead, self.info.out_features)
        return self.layout.fuse(parts, zeros)

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        group = self.info.tp_group
        if self.info.parallel == "column" and self.info.sequence_parallel:
            # the full sequence, whose gradient is this rank's slice: A's input gradient is all-reduced below
            grad_reduce = self.split_a  # with a rank-split A each rank only holds part of dL/dx
            return mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=grad_reduce,
                                                                 group=group)
        if self.info.parallel == "row" and not self.info.input_is_parallel and self._tp():
            return mappings.scatter_to_tensor_model_parallel_region(x, group=group)
        return x

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        if self.info.parallel == "row" and self.info.sequence_parallel:
            return mappings.scatter_to_sequence_parallel_region(y, group=self.info.tp_group)
        if self.info.parallel == "column" and self.info.gather_output:
            return mappings.gather_from_tensor_model_parallel_region(y, group=self.info.tp_group)
        return y

    def _base_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``W x`` without bias, TP-reduced like the layer's output (DoRA with input dropout, as in HF peft)."""
        from megatron.core.tensor_parallel import mappings

        y = F.linear(x.to(weight.dtype), weight.detach())
        if self.info.parallel == "row" and self._tp():
            y = mappings.reduce_from_tensor_model_parallel_region(y, group=self.info.tp_group)
        return self._output(y)

    def forward(self, x: torch.Tensor, out: torch.Tensor, *, weight: torch.Tensor,
                base_bias: torch.Tensor | None = None) -> torch.Tensor:
        for branch in self.branches.values():
            branch()  # runs its pre-hooks: the parameters are up to date below (see LoRABranch.forward)
        dtype = self.branches[next(iter(self.branches))].lora_a.dtype
        xa = self._adapter_input(x).to(dtype)
        dropped = self.training and isinstance(self.dropout, nn.Dropout) and self.dropout_position == "pre"
        if self.dropout_position == "pre":
            xa = self.dropout(xa)
        delta = self._lora(xa)
        if self.dropout_position == "post":
            delta = self.dropout(delta)  # (before the scale: dropout is linear, so the same thing)
        delta = self._output(delta).to(out.dtype)
        if not self.dora:
            return torch.add(out, delta, alpha=self.scale)  # scale and add in one pass over the output
        delta = delta * self.scale
        factor = self.dora_factor(weight).to(out.dtype)
        base = out if base_bias is None else out - base_bias
        if dropped:  # HF peft: the DoRA base term reads the dropped-out input too
            base = self._base_linear(xa, weight)
        return out + (factor - 1) * base + factor * delta

    # ---------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self, weight: torch.Tensor) -> None:
        """Fold the adapter into ``weight`` (LoRA: ``W + s BA``; DoRA: ``m / ||W + s BA|| * (W + s BA)``)."""
        if self.merged:
            return
        delta = self.delta_weight().float()
        if self.dora:
            factor = self.dora_factor(weight)
            self._merge_factor = factor
            lost = factor == 0  # m = 0: the merged row is 0, the base row cannot be computed back from it
            self._merge_lost = (lost, weight.float()[lost].clone()) if bool(lost.any()) else None
            weight.copy_((factor[:, None] * (weight.float() + delta)).to(weight.dtype))
        else:
            weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, weight: torch.Tensor) -> None:
        """Undo :meth:`merge`: the base weight comes back (up to rounding in the weight's dtype)."""
        if not self.merged:
            return
        delta = self.delta_weight().float()
        if self.dora:
            factor = self._merge_factor
            base = weight.float() / torch.where(factor == 0, 1.0, factor)[:, None] - delta
            if self._merge_lost is not None:
                rows, kept = self._merge_lost
                base[rows] = kept
            weight.copy_(base.to(weight.dtype))  # one copy (FP8 weights are re-quantised from it)
            del self._merge_factor, self._merge_lost
        else:
            weight.copy_((weight.float() - delta).to(weight.dtype))
        self.merged = False
