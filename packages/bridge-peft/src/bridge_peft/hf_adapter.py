"""Adapters in the HF PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

HF names come from bridge-convert's mapping table of the model family, so the fused layouts convert exactly as
the weights do: a fused ``linear_qkv`` adapter has one A, written as the ``lora_A`` of each of q/k/v, and its B
(and DoRA magnitude) is split into q/k/v rows by the same :class:`~bridge_convert.mappings.QKV` mapping that
splits the weight (``GatedMLP`` for gate/up). Canonical adapters write each projection's own A and B.

Export gathers TP shards (and broadcasts over PP) like bridge-convert's weight export, so any layout writes the
same bytes. Import decides the method from the file: q/k/v (gate/up) projections that all carry one identical A
load as a fused :class:`~bridge_peft.LoRA` / :class:`~bridge_peft.DoRA`; otherwise as
:class:`~bridge_peft.CanonicalLoRA`. Anything these cannot represent is one error naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "gather_adapter_tensors", "save_hf_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KINDS = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "magnitude"}
_HF_KIND = {v: k for k, v in _KINDS.items()}


@dataclass(frozen=True)
class _Entry:
    linear: str
    branch: str
    kind: str
    pp_rank: int
    local_shape: tuple[int, ...]
    dtype: torch.dtype
    split: tuple[int, int] | None


def _provider(model):
    from bridge_convert import AutoBridge

    return AutoBridge._provider_of(model)


def _split_of(param: torch.Tensor, tp_size: int) -> tuple[int, int] | None:
    if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return None


def _local_adapters(model, state):
    """Yield (entry, tensor) for every adapter tensor of this rank and ``{linear: settings}``."""
    from .adapters import LoRAAdapter
    from .base import global_module_names, model_chunks
    from .linear import ADAPTER_ATTR

    chunks, _ = model_chunks(model)
    entries, settings = [], {}
    for chunk in chunks:
        for name, _, module in global_module_names(chunk):
            adapter = getattr(module, ADAPTER_ATTR, None)
            if adapter is None:
                continue
            if not isinstance(adapter, LoRAAdapter):
                raise TypeError(f"{name} carries a {type(adapter).__name__}: only LoRA / DoRA / canonical LoRA "
                                "adapters have an HF PEFT form")
            settings[name] = {"dim": adapter.dim, "alpha": adapter.scale * adapter.dim, "dora": adapter.dora,
                              "dropout": float(getattr(adapter.dropout, "p", 0.0)), "merged": adapter.merged,
                              "dropout_position": getattr(adapter, "dropout_position", "pre")}
            for proj, branch in adapter.branches.items():
                for kind in ("lora_a", "lora_b", "magnitude"):
                    param = getattr(branch, kind)
                    if param is None:
                        continue
                    entry = _Entry(name, proj, kind, state.pp_rank, tuple(param.shape), param.dtype,
                                   _split_of(param, state.tp_size))
                    entries.append((entry, param))
    return entries, settings


def gather_adapter_tensors(model):
    """``({(linear, branch, kind): full tensor}, {linear: settings})`` of the whole model, on every rank."""
    import torch.distributed as dist

    from bridge_convert.model_bridge import unshard
    from bridge_convert.runtime import get_parallel_state

    state = get_parallel_state()
    mine, settings = _local_adapters(model, state)
    entries = [e for e, _ in mine]
    if state.pp_size > 1:
        gathered: list = [None] * state.pp_size
        dist.all_gather_object(gathered, (entries, settings), group=state.pp_group)
        entries = [e for stage in gathered for e in stage[0]]
        settings = {k: v for stage in gathered for k, v in stage[1].items()}
    local = {(e.linear, e.branch, e.kind): t for e, t in mine}
    pp_ranks = dist.get_process_group_ranks(state.pp_group) if state.pp_size > 1 else None
    out = {}
    for e in sorted(entries, key=lambda e: (e.linear, e.branch, e.kind)):
        full = None
        if e.pp_rank == state.pp_rank:
            tensor = local[(e.linear, e.branch, e.kind)].detach()
            if e.split is not None:
                pieces = [torch.empty_like(tensor) for _ in range(state.tp_size)]
                dist.all_gather(pieces, tensor.contiguous(), group=state.tp_group)
                full = unshard(pieces, e.split)
            else:
                full = tensor
        if state.pp_size > 1:
            if full is None:
                shape = list(e.local_shape)
                if e.split is not None:
                    shape[e.split[0]] *= state.tp_size
                full = torch.empty(shape, dtype=e.dtype, device=state.device)
            full = full.contiguous()
            dist.broadcast(full, src=pp_ranks[e.pp_rank], group=state.pp_group)
        out[(e.linear, e.branch, e.kind)] = full.cpu().clone()
    return out, settings


def _linear_mapping(bridge, provider, linear: str):
    """(mapping, layer, HF module names) of the megatron linear layer ``linear``."""
    mapping, layer = bridge.model_bridge.find(bridge.model_bridge.mappings_for(provider), f"{linear}.weight")
    modules = [n.removesuffix(".weight") for n in mapping.hf_names(layer)]
    return mapping, layer, modules


def _staged(out_dir, overwrite: bool):
    from bridge_convert.outputs import staged_output_dir

    return staged_output_dir(out_dir, overwrite=overwrite)


def save_hf_adapter(bridge, model, out_dir: str | os.PathLike, *, overwrite: bool = False,
                    base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as an HF PEFT adapter directory (``PeftModel.from_pretrained`` loads it).

    Every rank calls this (the export gathers TP / PP shards); rank 0 writes. The directory appears only when
    complete.

    Args:
        bridge: the model's :class:`bridge_convert.AutoBridge` (its mapping table names the HF modules).
        model: the model chunks with adapters.
        out_dir: output directory (refused when it is not empty, unless ``overwrite``).
        base_model_name_or_path: recorded in ``adapter_config.json``; default: the bridge's HF directory.

    Raises:
        ValueError: for a model without adapters, merged adapters, or adapters HF PEFT cannot express (different
            ranks or scales per layer).
    """
    from bridge_convert.model_bridge import mapping_context
    from bridge_convert.runtime import get_parallel_state

    provider = _provider(model)
    tensors, settings = gather_adapter_tensors(model)
    if not settings:
        raise ValueError("the model has no adapters to save: apply LoRA / DoRA / CanonicalLoRA first")
    if any(s["merged"] for s in settings.values()):
        raise ValueError("the adapters are merged into the base weights: unmerge_adapters(model) before "
                         "save_hf_adapter, or export the merged model with bridge.save_hf_pretrained")
    kinds = {(s["dim"], s["alpha"], s["dora"], s["dropout"]) for s in settings.values()}
    if len(kinds) > 1:
        raise ValueError(f"HF PEFT adapters have one rank / alpha / DoRA setting; these layers differ: {sorted(kinds)}")
    dim, alpha, dora, dropout = kinds.pop()
    if dropout and any(s["dropout_position"] == "post" for s in settings.values()):
        import warnings

        warnings.warn(f"the adapters drop out their output (dropout_position='post'); HF peft has only input dropout: "
                      f"adapter_config.json's lora_dropout={dropout} makes training with peft drop out the input "
                      "instead (inference, which applies no dropout, is the same)", UserWarning, stacklevel=2)
    hf: dict[str, torch.Tensor] = {}
    for (linear, branch, kind), full in tensors.items():
        mapping, _, modules = _linear_mapping(bridge, provider, linear)
        if branch != "all":
            pieces = {modules[_projection_index(branch)]: full}
        elif kind == "lora_a":
            pieces = dict.fromkeys(modules, full)
        else:
            ctx = mapping_context(provider, tuple(full.shape))
            pieces = dict(zip(modules, mapping.to_hf(full, ctx)))
        for module, tensor in pieces.items():
            hf[f"{_PREFIX}{module}.{_HF_KIND[kind]}"] = tensor.contiguous().clone()
    adapted = sorted({k[len(_PREFIX):].rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in hf})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(dim), "lora_alpha": _number(alpha),
        "lora_dropout": dropout, "use_dora": bool(dora), "target_modules": _target_modules(bridge, provider, adapted),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path or (str(bridge.hf_path) if bridge.hf_path else None),
        "revision": None,
    }
    state = get_parallel_state()
    out = Path(out_dir)
    if state.rank == 0:
        from safetensors.torch import save_file

        with _staged(out, overwrite) as tmp:
            save_file(hf, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state.barrier()
    return out


def _number(value: float):
    return int(value) if float(value).is_integer() else float(value)


def _projection_index(branch: str) -> int:
    return {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}[branch]


def _all_linear_modules(bridge, provider) -> dict[str, tuple[str, int, object, str]]:
    """HF module -> (megatron linear, projection index, mapping, layer) for every linear of the whole model."""
    out = {}
    for mapping in bridge.model_bridge.mappings_for(provider):
        if not mapping.megatron.endswith(".weight") or not mapping.export:
            continue
        linear = mapping.megatron.removesuffix(".weight")
        if not (linear.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")) or
                linear == "output_layer"):
            continue
        layers = [str(i) for i in range(provider.num_layers)] if "*" in linear else [""]
        for layer in layers:
            for i, name in enumerate(mapping.hf_names(layer)):
                out[name.removesuffix(".weight")] = (linear.replace("*", layer), i, mapping, layer)
    return out


def _target_modules(bridge, provider, adapted: list[str]):
    """HF peft's ``target_modules``: leaf names when they cover exactly the adapted modules, else a regex."""
    import re

    leaves = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    covered = sorted(m for m in _all_linear_modules(bridge, provider) if m.rsplit(".", 1)[-1] in leaves)
    if covered == adapted:
        return leaves
    return "^(" + "|".join(re.escape(m) for m in adapted) + ")$"
