"""Import an HF PEFT LoRA / DoRA adapter directory onto a megatron-core model (see :mod:`.hf_adapter`)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch

from .hf_adapter import _KINDS, _PREFIX, ADAPTER_CONFIG, ADAPTER_WEIGHTS, _all_linear_modules, _provider

__all__ = ["load_hf_adapter", "read_hf_adapter"]

# adapter_config.json settings HF peft offers that have no megatron form here, with the value meaning "off"
_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
                "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
                "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": None, "arrow_config": None,
                "velora_config": None, "monteclora_config": None, "kasa_config": None}
# init_lora_weights values for which peft rewrites the base weights when it loads the adapter (W - s B0 A0 from the
# initial adapter it recomputes): the saved A and B alone do not give the adapter's model
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# what peft assumes for keys an adapter_config.json leaves out (LoraConfig's defaults)
_PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}
_CANONICAL = {("linear_qkv", 0): "linear_q", ("linear_qkv", 1): "linear_k", ("linear_qkv", 2): "linear_v",
              ("linear_fc1", 0): "linear_fc1_gate", ("linear_fc1", 1): "linear_fc1_up"}


def read_hf_adapter(peft_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of an HF PEFT adapter directory.

    Raises:
        FileNotFoundError: for a missing directory, config or safetensors file (a ``.bin``-only adapter is named).
        ValueError: for a config that is not a LoRA adapter or uses settings that have no megatron form.
    """
    directory = Path(peft_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"HF PEFT adapter directory not found: {directory}")
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        named = sorted(p.parent.name for p in directory.glob(f"*/{ADAPTER_CONFIG}"))
        hint = (f"; it holds the adapters {named} in subdirectories (peft saves a non-default adapter under its "
                f"name): pass {directory / named[0]}") if named else ": not an HF PEFT adapter directory"
        raise FileNotFoundError(f"{config_path} is missing{hint}")
    if not weights_path.is_file():
        hint = " (found adapter_model.bin: re-save it with safe_serialization=True)" if (
            directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{weights_path} is missing{hint}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config).__name__}, not an adapter config object")
    config = {**_PEFT_DEFAULTS, **config}
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters (LoRA, DoRA) "
                         "can be loaded")
    bad = [f"{k}={config[k]!r}" for k, off in _UNSUPPORTED.items() if config.get(k, off) not in (off, [], {})]
    for key, base in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        if any(v != config.get(base) for v in (config.get(key) or {}).values()):
            bad.append(f"{key}={config[key]!r} (per-module ranks / alphas)")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        bad.append(f"init_lora_weights={init!r} (peft rewrites the base weights with it when loading; convert the "
                   "adapter to plain LoRA with peft's save_pretrained(..., "
                   "path_initial_model_for_weight_conversion=...) and load that)")
    if bad:
        raise ValueError(f"{config_path}: cannot represent these HF peft settings on a megatron model: "
                         + ", ".join(bad))
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{config_path}: r must be a positive integer (the LoRA rank), got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{config_path}: lora_alpha must be a positive number, got {alpha!r}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001  safetensors raises its own error type for a truncated / corrupt file
        raise ValueError(f"{weights_path} is not a readable safetensors file ({exc}); re-save the adapter") from None
    return config, tensors


# tensors peft writes beside the LoRA ones: a copy of an adapted embedding layer's own weight
# (``save_embedding_layers``, on by default when lm_head / embed_tokens is targeted) and LoRA on an embedding
_PEFT_EXTRA = {"base_layer.weight": "base", "lora_embedding_A": "embedding", "lora_embedding_B": "embedding"}


def _parse_keys(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    per_module: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        rest = key.removeprefix(_PREFIX)
        for suffix, kind in {**_KINDS, **_PEFT_EXTRA}.items():
            if key.startswith(_PREFIX) and rest.endswith("." + suffix):
                per_module[rest[: -len(suffix) - 1]][kind] = tensor
                break
        else:
            raise ValueError(f"{where}: tensor {key!r} is not a LoRA A / B / DoRA magnitude of a module "
                             f"(expected '{_PREFIX}<module>.lora_A.weight' ...)")
    return per_module


def load_hf_adapter(bridge, model, peft_dir: str | os.PathLike, *, training: bool = False):
    """Apply the HF PEFT adapter in ``peft_dir`` to ``model`` (chunks without adapters); returns the model.

    Every rank calls this. q/k/v (gate/up) adapters that share one A load as fused LoRA / DoRA, others as
    :class:`~bridge_peft.CanonicalLoRA` (``use_dora`` for DoRA). ``training`` makes the adapters trainable.

    Raises:
        FileNotFoundError: for a missing adapter directory or file.
        ValueError: for an adapter made for another base (a shape mismatch, named with both shapes), modules
            that are not linear layers of this model (embeddings, a tied lm_head), or unsupported settings.
            Nothing is attached to the model when this is raised.
    """
    from bridge_convert.model_bridge import export_hf_shapes
    from bridge_convert.runtime import get_parallel_state

    from .lora import CanonicalLoRA, DoRA, LoRA

    directory = Path(peft_dir)
    config, tensors = read_hf_adapter(directory)
    provider = _provider(model)
    state = get_parallel_state()
    from .base import model_chunks

    chunks, _ = model_chunks(model)
    shapes = dict(export_hf_shapes(bridge.model_bridge, provider, chunks, state))
    table = _all_linear_modules(bridge, provider)
    per_module = _parse_keys(tensors, directory)
    r, dora = int(config["r"]), bool(config.get("use_dora", False))
    alpha = float(config["lora_alpha"]) * (math.sqrt(r) if config.get("use_rslora") else 1.0)
    problems, groups = [], defaultdict(dict)
    saved_bases = {}
    for module, parts in sorted(per_module.items()):
        if module not in table or "embedding" in parts:
            problems.append(f"{module} is not a linear layer of this {bridge.model_bridge.hf_architecture} model "
                            "(LoRA on embeddings or a tied lm_head has no megatron form)")
            continue
        if "base" in parts:
            saved_bases[module] = parts.pop("base")
        need = {"lora_a", "lora_b"} | ({"magnitude"} if dora else set())
        if set(parts) != need:
            problems.append(f"{module} has {sorted(parts)}, expected {sorted(need)} (use_dora={dora})")
            continue
        out_f, in_f = shapes[module + ".weight"]
        ranks = {parts["lora_a"].shape[0], parts["lora_b"].shape[-1]}
        if ranks != {r}:
            problems.append(f"{module}: its lora_A / lora_B have rank {sorted(ranks)}, but adapter_config.json says "
                            f"r={r}; fix r in {directory / 'adapter_config.json'}")
            continue
        expect = {"lora_a": (r, in_f), "lora_b": (out_f, r), "magnitude": (out_f,)}
        for kind, tensor in parts.items():
            if tuple(tensor.shape) != expect[kind]:
                problems.append(f"{module}.{kind}: shape {tuple(tensor.shape)}, this model needs {expect[kind]} "
                                "(an adapter for another base model?)")
        linear, index, mapping, layer = table[module]
        groups[linear][index] = (module, mapping, layer)
    if not problems and saved_bases:
        problems = _saved_base_problems(bridge, provider, chunks, state, saved_bases,
                                        {f"{table[m][0]}.weight" for m in saved_bases})
    if problems:
        raise ValueError(f"cannot load the HF adapter {directory} onto this model:\n  " + "\n  ".join(problems))

    def fusable(linear: str) -> bool:
        members = groups[linear]
        mapping = next(iter(members.values()))[1]
        if len(members) != len(mapping.hf):
            return False
        first = per_module[members[0][0]]["lora_a"]
        return all(torch.equal(per_module[m]["lora_a"], first) for m, _, _ in members.values())

    fused_linears = [lin for lin in groups if len(next(iter(groups[lin].values()))[1].hf) > 1]
    canonical = not all(fusable(lin) for lin in fused_linears)
    common = dict(dim=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0) or 0.0))
    if canonical:
        targets = []
        for linear, members in groups.items():
            stem, _, leaf = linear.rpartition(".")
            targets += [f"{stem}.{_CANONICAL[(leaf, i)]}" if (leaf, i) in _CANONICAL else linear for i in members]
        peft = CanonicalLoRA(target_modules=sorted(set(targets)), use_dora=dora, **common)
    else:
        peft = (DoRA if dora else LoRA)(target_modules=sorted(groups), **common)
    peft(model, training=training)
    _fill(model, provider, groups, per_module, state)
    return model


def _saved_base_problems(bridge, provider, chunks, state, saved: dict[str, torch.Tensor],
                         megatron_names: set[str]) -> list[str]:
    """peft saved these layers' own weights with the adapter (and loads them over the base's): they must be the
    weights this model already has, else the adapter belongs to a changed base (e.g. a resized vocabulary)."""
    from bridge_convert.model_bridge import export_hf_weights

    problems = []
    # only those layers (every rank consumes the whole stream)
    for name, ours in export_hf_weights(bridge.model_bridge, provider, chunks, state, only=megatron_names):
        module = name.removesuffix(".weight")
        if module in saved:
            theirs = saved.pop(module)
            if tuple(theirs.shape) != tuple(ours.shape):
                problems.append(f"{module}.base_layer.weight: the adapter carries this layer's own weight with shape "
                                f"{tuple(theirs.shape)}, this model's is {tuple(ours.shape)} (an adapter for another "
                                "base model?)")
            elif not _same_weights(theirs, ours):
                diff = (theirs.float() - ours.float()).abs().max().item()
                problems.append(f"{module}.base_layer.weight: the adapter carries this layer's own weight (peft's "
                                f"save_embedding_layers), which differs from this model's (max abs diff {diff:.3g}); "
                                "load it onto the base model it was trained from")
    return problems


def _same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, or equal to the rounding of the coarser dtype (a bf16 model loaded from the fp32 weights peft saved)."""
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    coarse = max((a.dtype, b.dtype), key=lambda d: torch.finfo(d).eps)
    return torch.allclose(a.to(coarse).float(), b.to(coarse).float(), rtol=torch.finfo(coarse).eps, atol=0)


def _fill(model, provider, groups, per_module, state) -> None:
    from bridge_convert.model_bridge import mapping_context, shard

    from .adapters import LoRAAdapter
    from .base import global_module_names, model_chunks
    from .linear import ADAPTER_ATTR

    chunks, _ = model_chunks(model)
    index_of = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}
    for chunk in chunks:
        for name, _, module in global_module_names(chunk):
            adapter = getattr(module, ADAPTER_ATTR, None)
            if not isinstance(adapter, LoRAAdapter):
                continue
            members = groups[name]
            mapping = next(iter(members.values()))[1]
            for proj, branch in adapter.branches.items():
                for kind in ("lora_a", "lora_b", "magnitude"):
                    param = getattr(branch, kind)
                    if param is None:
                        continue
                    if proj != "all":
                        full = per_module[members[index_of[proj]][0]][kind]
                    elif kind == "lora_a":
                        full = per_module[members[0][0]][kind]
                    else:
                        hf = [per_module[members[i][0]][kind] for i in sorted(members)]
                        rows = param.shape[0] * (state.tp_size if getattr(param, "tensor_model_parallel", False)
                                                 else 1)
                        full = mapping.to_megatron(hf, mapping_context(provider, (rows, *hf[0].shape[1:])))
                    split = ((int(param.partition_dim), int(getattr(param, "partition_stride", 1)))
                             if getattr(param, "tensor_model_parallel", False) and state.tp_size > 1 else None)
                    local = shard(full, split, state.tp_rank, state.tp_size)
                    with torch.no_grad():
                        param.copy_(local.to(device=param.device, dtype=param.dtype))
