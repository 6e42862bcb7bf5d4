"""What an adapter needs to know about the megatron-core linear layer it sits on, and how it is attached.

Supported layers: megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` (local and native specs) and
Transformer Engine's column / row parallel linears, including ``TELayerNormColumnParallelLinear``, which fuses the
pre-attention / pre-MLP norm into ``linear_qkv`` / ``linear_fc1``. There the adapter must read the *normalised*
input, so the layer is switched to TE's ``return_layernorm_output`` and the forward hook takes the norm output from what the layer returns.

The adapter is attached as the child module ``adapter`` of the linear layer (``...linear_qkv.adapter.*``), so
the base parameters keep their names (conversion and checkpoints are unchanged) and a forward hook adds the
adapter's contribution to the layer's output. Every adapter parameter carries ``bridge_adapter = True``, which
bridge-convert's HF export skips, so a merged model exports with ``bridge.save_hf_pretrained``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ADAPTER_ATTR", "AdapterModule", "LinearInfo", "attach_adapter", "adapted_linears", "is_adapter_state_key",
           "linear_info"]

ADAPTER_ATTR = "adapter"


def is_adapter_state_key(key: str) -> bool:
    """True for state-dict keys of adapter tensors (``....adapter.<...>``)."""
    return f".{ADAPTER_ATTR}." in f".{key}"


@dataclass(frozen=True)
class LinearInfo:
    """The TP layout of one linear layer, as its weight ``[out_local, in_local]`` is split."""

    parallel: str
    """``column`` (weight split on the output dim) or ``row`` (split on the input dim)."""
    in_features: int
    out_features: int
    """Local (this TP rank's) sizes."""
    tp_size: int
    tp_rank: int
    tp_group: Any
    sequence_parallel: bool
    input_is_parallel: bool
    """Row-parallel only: the input arrives split on its last dim (else the layer scatters it)."""
    gather_output: bool
    """Column-parallel only: the layer all-gathers its output over TP."""
    layernorm_fused: bool
    """TE's LayerNormLinear: the adapter reads the layer's own norm output."""
    weight_stride: int
    """``partition_stride`` of the weight (2 for the fused gate/up projection)."""

    @property
    def full_in(self) -> int:
        return self.in_features * (self.tp_size if self.parallel == "row" else 1)

    @property
    def full_out(self) -> int:
        return self.out_features * (self.tp_size if self.parallel == "column" else 1)


def _tp_group(module):
    group = getattr(module, "tp_group", None)
    if group is None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_tensor_model_parallel_group()
    return group


def linear_info(module: nn.Module, name: str) -> LinearInfo:
    """Describe ``module`` (named ``name`` for messages).

    Raises:
        TypeError: for a module that is not a megatron-core or TE tensor-parallel linear layer, or one whose
            communication an adapter cannot follow (expert-parallel linears).
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    weight = getattr(module, "weight", None)
    if isinstance(module, ColumnParallelLinear):
        parallel = "column"
    elif isinstance(module, RowParallelLinear):
        parallel = "row"
    elif getattr(module, "parallel_mode", None) in ("column", "row"):  # Transformer Engine
        parallel = module.parallel_mode
    else:
        raise TypeError(f"{name} is a {type(module).__name__}, not a tensor-parallel linear layer: target linear "
                        "layers only (linear_qkv, linear_proj, linear_fc1, linear_fc2)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{name} ({type(module).__name__}) has no 2-D weight to adapt")
    if getattr(module, "explicit_expert_comm", False) or getattr(module, "is_expert", False):
        raise TypeError(f"{name}: expert-parallel linear layers are not supported by bridge-peft")
    group = _tp_group(module)
    tp_size = group.size() if group is not None else 1
    tp_rank = group.rank() if group is not None else 0
    out_local, in_local = weight.shape
    return LinearInfo(
        parallel=parallel, in_features=int(in_local), out_features=int(out_local), tp_size=tp_size,
        tp_rank=tp_rank, tp_group=group,
        sequence_parallel=bool(getattr(module, "sequence_parallel", False)) and tp_size > 1,
        input_is_parallel=bool(getattr(module, "input_is_parallel", True)),
        gather_output=bool(getattr(module, "gather_output", False)) and tp_size > 1,
        layernorm_fused=hasattr(module, "layer_norm_weight") and hasattr(module, "return_layernorm_output"),
        weight_stride=int(getattr(weight, "partition_stride", 1)),
    )


def _bias_in_output(module: nn.Module, returned_bias) -> bool:
    bias = getattr(module, "bias", None)
    return returned_bias is None and isinstance(bias, torch.Tensor) and bias.numel() > 0


def _forward_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    adapter = getattr(module, ADAPTER_ATTR)
    if adapter.info.layernorm_fused:
        if len(output) == 3:  # TE return_bias: (out, bias, ln_out)
            out, bias, x = output
        else:  # megatron wraps TE's (out, ln_out) as ((out, ln_out), None)
            (out, x), bias = output
    else:
        out, bias = output
        x = args[0] if args else kwargs["input_"]
    if adapter.active:
        out = adapter(x, out, weight=module.weight,
                      base_bias=module.bias if _bias_in_output(module, bias) else None)
    return out, bias


def _sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
    """The base layer's own sharded state plus the adapter's (with its own TP split rules)."""
    base = type(self).sharded_state_dict(self, prefix, sharded_offsets, metadata)
    out = {k: v for k, v in base.items() if not is_adapter_state_key(k[len(prefix):])}
    out.update(getattr(self, ADAPTER_ATTR).sharded_state_dict(f"{prefix}{ADAPTER_ATTR}.", sharded_offsets,
                                                               metadata))
    return out


def attach_adapter(module: nn.Module, adapter: nn.Module) -> None:
    """Attach ``adapter`` to ``module`` (see the module docstring): child module, hook, checkpoint keys.

    Raises:
        ValueError: if ``module`` already has an adapter (a PEFT method applied twice).
    """
    if hasattr(module, ADAPTER_ATTR):
        raise ValueError(f"{type(module).__name__} already has an adapter: apply a PEFT method once per model")
    for param in adapter.parameters():
        param.bridge_adapter = True
    module.add_module(ADAPTER_ATTR, adapter)
    if adapter.info.layernorm_fused:
        # TE returns the norm output (sequence-local under sequence parallelism; the adapter gathers it) and
        # adds the gradient that flows back into it to the norm's input gradient.
        module.return_layernorm_output = True
    # First among the layer's forward hooks: the native spec's output-release hooks (norm / SwiGLU recompute)
    # free the layer's input after its forward and refill it before its backward, so the adapter must read the
    # input before them (autograd then holds the same storage for the adapter's backward, refilled in time).
    module.register_forward_hook(_forward_hook, with_kwargs=True, prepend=True)
    if hasattr(module, "sharded_state_dict"):
        module.sharded_state_dict = types.MethodType(_sharded_state_dict, module)


def adapted_linears(chunk: nn.Module):
    """Yield ``(local name, linear module, adapter)`` for every adapted linear layer of one model chunk."""
    for name, module in chunk.named_modules():
        adapter = getattr(module, ADAPTER_ATTR, None)
        if isinstance(adapter, AdapterModule):
            yield name, module, adapter


class AdapterModule(nn.Module):
    """Base class of every adapter (built-in and user-defined).

    Subclasses implement ``forward(x, out, *, weight, base_bias) -> out``: ``x`` is the layer's input as the base
    layer reads it (for TE's fused norm: the norm output, sequence-local under sequence parallelism), ``out``
    the base output (TP-local, bias included when
    ``base_bias`` is given). ``info`` is the :class:`LinearInfo`; ``active`` turns the adapter on and off.
    """

    def __init__(self, info: LinearInfo) -> None:
        super().__init__()
        self.info = info
        self.enabled = True
        self.merged = False

    @property
    def active(self) -> bool:
        return self.enabled and not self.merged

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Adapter tensors as dist-checkpoint shards: TP-split ones along their ``partition_dim``.

        In a layer, megatron-core stacks a tensor over all layers (``sharded_offsets`` starts with the layer axis):
        an adapter on some layers only (``layer_stacked`` False, set by :class:`~bridge_peft.PEFT`) would leave
        that stack incomplete, so its tensors are saved per layer, under ``...adapter.layer_<global index>.``.
        """
        layer = None
        if not getattr(self, "layer_stacked", True) and sharded_offsets and sharded_offsets[0][0] == 0:
            layer, sharded_offsets = sharded_offsets[0][1], tuple(sharded_offsets[1:])
        sharded = self._sharded_tensors(prefix, sharded_offsets)
        if layer is not None:
            for value in sharded.values():
                value.key = f"{prefix}layer_{layer}.{value.key[len(prefix):]}"
        return sharded

    def _sharded_tensors(self, prefix: str, sharded_offsets: tuple):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        axis = {k: int(p.partition_dim) for k, p in self.named_parameters()
                if getattr(p, "tensor_model_parallel", False) and self.info.tp_size > 1}
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets)
        for key, param in self.named_parameters():
            if getattr(param, "partition_stride", 1) == 2 and self.info.tp_size > 1:
                from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

                sharded[prefix + key] = apply_swiglu_sharded_factory(sharded[prefix + key], sharded_offsets,
                                                                     tp_group=self.info.tp_group)
        return sharded
