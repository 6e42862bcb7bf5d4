"""LoRA, DoRA and canonical LoRA: the built-in PEFT methods."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import LoRAAdapter, fused_layout, real_out_rows
from .base import PEFT
from .linear import linear_info
from .matching import matching_patterns

__all__ = ["CANONICAL_TARGETS", "CanonicalLoRA", "DoRA", "LoRA"]

_INITS = ("zero", "xavier", "kaiming", "normal")


def _dtype(value):
    if value is None:
        return None
    from bridge_convert.hf_config import parse_dtype

    return parse_dtype(value)


@dataclass(kw_only=True)
class LoRA(PEFT):
    """Low-rank adapters ``W x + (alpha / dim) B A x`` on megatron-core linear layers.

    One adapter covers a fused layer's whole output (``linear_qkv``: q, k and v; ``linear_fc1``: gate and up);
    see :class:`CanonicalLoRA` for separate ones.

    Args:
        dim: the rank r (> 0).
        alpha: scale numerator; the adapter output is scaled by ``alpha / dim``.
        dropout: dropout probability on the adapter path (0 disables it).
        dropout_position: ``pre`` (on the adapter input, as HF peft) or ``post`` (on its output).
        lora_A_init_method, lora_B_init_method: ``xavier``, ``kaiming`` (HF peft's default for A), ``normal``
            or ``zero`` (B's default, so training starts from the base model).
        lora_dtype: adapter parameter dtype (``"float32"``, ``"bfloat16"``...); None: the base weight's.
        split_a_on_rank: on column-parallel layers split A over TP on the rank dim (needs ``dim % TP == 0``)
            instead of replicating it.
        seed: seeds the adapter initialisation (with each layer's global name; independent of TP / PP).
    """

    dim: int = 32
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: str | None = None
    split_a_on_rank: bool = False
    seed: int = 0

    use_dora: bool = field(default=False, init=False, repr=False)

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"{name}.dim must be a positive integer (the LoRA rank), got {self.dim!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"{name}.alpha must be a finite number > 0 (the scale is alpha / dim), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.split_a_on_rank, bool):
            raise ValueError(f"{name}.split_a_on_rank must be true or false, got {self.split_a_on_rank!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{name}.seed must be an integer, got {self.seed!r}")
        if self.dropout_position not in ("pre", "post"):
            raise ValueError(f"{name}.dropout_position must be 'pre' or 'post', got {self.dropout_position!r}")
        if self.dropout_position == "post" and self.dropout == 0:
            raise ValueError(f"{name}.dropout_position='post' places a dropout, but {name}.dropout is 0; set "
                             "dropout > 0, or drop dropout_position")
        for key in ("lora_A_init_method", "lora_B_init_method"):
            if getattr(self, key) not in _INITS:
                raise ValueError(f"{name}.{key} must be one of {_INITS}, got {getattr(self, key)!r}")
        try:
            _dtype(self.lora_dtype)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{name}.lora_dtype {self.lora_dtype!r} is not a dtype ({exc})") from None

    def check_trainable(self, modules: list[nn.Module]) -> None:
        dtype = _dtype(self.lora_dtype)
        if dtype is not None and dtype.itemsize < 4 and any(m.weight.dtype == torch.float32 for m in modules):
            raise ValueError(f"{type(self).__name__}.lora_dtype={self.lora_dtype!r} on float32 weights: without mixed "
                             "precision megatron-core's optimizer steps float32 parameters only (it fails at the first "
                             "step); train with a bf16 / fp16 mixed-precision recipe, or leave lora_dtype unset")

    def save_hf(self, bridge, model, out_dir) -> None:
        """bridge-train's ``checkpoint.save_hf`` for a run with this method: the adapters in the HF PEFT format
        (:func:`~bridge_peft.save_hf_adapter`; every rank calls it)."""
        from .hf_adapter import save_hf_adapter

        save_hf_adapter(bridge, model, out_dir)

    def make_adapter(self, module: nn.Module, name: str, projections: tuple[str, ...]) -> LoRAAdapter:
        info = linear_info(module, name)
        return LoRAAdapter(
            info, fused_layout(module, name, info), projections, name=name, weight=module.weight, dim=self.dim,
            alpha=float(self.alpha), dropout=float(self.dropout), dropout_position=self.dropout_position,
            a_init=self.lora_A_init_method, b_init=self.lora_B_init_method, dtype=_dtype(self.lora_dtype),
            dora=self.use_dora, split_a_on_rank=self.split_a_on_rank, seed=self.seed,
            real_rows=real_out_rows(module, name, info))


@dataclass(kw_only=True)
class DoRA(LoRA):
    """Weight-decomposed LoRA: ``m * (W + s B A) / ||W + s B A||`` with a trainable magnitude ``m`` per output row.

    As in HF peft, the norm is taken per output row over the input dim, detached from the graph, and ``m`` starts
    at ``||W||`` (so the model starts unchanged). Under TP the norm's squares are summed over the ranks that split
    the input dim (row-parallel layers). Exported to HF as ``lora_magnitude_vector`` with ``use_dora: true``.
    """

    alpha: float = 64
    use_dora: bool = field(default=True, init=False, repr=False)


#: canonical target name -> (fused layer name, projection)
CANONICAL_TARGETS = {
    "linear_q": ("linear_qkv", "q"), "linear_k": ("linear_qkv", "k"), "linear_v": ("linear_qkv", "v"),
    "linear_fc1_gate": ("linear_fc1", "gate"), "linear_fc1_up": ("linear_fc1", "up"),
}


def _canonical_names(name: str) -> list[tuple[str, str]]:
    """(virtual name, projection) of a layer: ``...linear_qkv`` -> ``...linear_q`` / ``_k`` / ``_v``."""
    base, _, leaf = name.rpartition(".")
    prefix = base + "." if base else ""
    out = [(prefix + virtual, proj) for virtual, (fused, proj) in CANONICAL_TARGETS.items() if fused == leaf]
    return out or [(name, "all")]


@dataclass(kw_only=True)
class CanonicalLoRA(LoRA):
    """LoRA with separate adapters for the projections of fused layers, as HF models have them.

    Targets are the names of the unfused projections: ``linear_q``, ``linear_k``, ``linear_v`` (parts of
    ``linear_qkv``), ``linear_fc1_gate``, ``linear_fc1_up`` (parts of ``linear_fc1``), and the unfused layers
    ``linear_proj`` / ``linear_fc2``; patterns match these virtual names (``*.layers.0.*.linear_q``). Each
    projection gets its own A and B; the outputs are interleaved into the fused layer's layout. ``use_dora``
    adds a DoRA magnitude per projection (what an HF peft DoRA adapter needs).
    """

    target_modules: list[str] = field(default_factory=lambda: [
        "linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1_gate", "linear_fc1_up", "linear_fc2"])
    use_dora: bool = False

    def targets(self, name: str, module: nn.Module) -> list[tuple[str, str]]:
        found = []
        for virtual, proj in _canonical_names(name):
            found += [(p, proj) for p in matching_patterns(virtual, self.target_modules)]
        return found

    def make_adapter(self, module: nn.Module, name: str, projections: tuple[str, ...]) -> LoRAAdapter:
        info = linear_info(module, name)
        layout = fused_layout(module, name, info)
        if projections != ("all",) and set(projections) - set(layout.projections):
            raise ValueError(f"{name}: cannot split this layer into {projections} (its layout is {layout.kind})")
        return LoRAAdapter(
            info, layout, projections, name=name, weight=module.weight, dim=self.dim, alpha=float(self.alpha),
            dropout=float(self.dropout), dropout_position=self.dropout_position, a_init=self.lora_A_init_method,
            b_init=self.lora_B_init_method, dtype=_dtype(self.lora_dtype), dora=self.use_dora,
            split_a_on_rank=self.split_a_on_rank, seed=self.seed, real_rows=real_out_rows(module, name, info))
