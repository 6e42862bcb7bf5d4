"""ModelBridge: one model family's mapping table and config translation, plus the parallel-aware engine.

Import (HF -> Megatron): every rank reads, from the lazy HF reader, only the tensors of the parameters it holds
(its pipeline stage), builds each full megatron tensor through the mapping and keeps its own tensor-parallel
slice. No collective is needed, and the same code places layers on any PP / VP stage via megatron-core's global
``layer_number``.

Export (Megatron -> HF): the ranks first agree on one global, deterministically ordered task list (every parameter
of every stage). For each task the owning stage all-gathers the TP shards, broadcasts the full tensor along the
pipeline group, and every rank converts it to HF tensors, so any rank can stream the full HF checkpoint.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .errors import CheckpointMismatchError
from .finite import NonFinite
from .mappings import Mapping, MappingContext, VocabParallel
from .quantized import is_quantized_param, load_into_quantized

if TYPE_CHECKING:  # the provider imports megatron-core; the tables and the offline converter must not
    from .provider import GPTModelProvider

__all__ = ["ModelBridge", "ParamTask", "megatron_param_tasks"]


@dataclass(frozen=True)
class ModelBridge:
    """A model family: HF architecture name, mapping table, config translation.

    Args:
        hf_architecture: the ``architectures[0]`` of the HF config (registry key).
        mappings: the table; several entries may describe the same HF tensor under different megatron spellings
            (local / native / TE-fused names), only those matching a built parameter are used.
        config_to_provider: pure function, HF config dict -> GPTModelProvider keyword arguments.
        provider_to_config: pure function, (provider, source HF config dict or None) -> HF config dict.
        ignore_hf: glob patterns of HF tensors to skip on import (e.g. persisted rotary buffers).
        tied_aliases: HF names that duplicate another tensor when embeddings are tied (``lm_head.weight``).
        hf_model_type: the config's ``model_type``, which names the architecture of a config.json without
            ``architectures`` (as transformers' auto classes read it); None: such configs are refused.
    """

    hf_architecture: str
    mappings: tuple[Mapping, ...]
    config_to_provider: Callable[[dict[str, Any]], dict[str, Any]]
    provider_to_config: Callable[[GPTModelProvider, dict[str, Any] | None], dict[str, Any]]
    ignore_hf: tuple[str, ...] = ()
    tied_aliases: dict[str, str] = field(default_factory=lambda: {"lm_head.weight": "model.embed_tokens.weight"})
    hf_model_type: str | None = None

    def mappings_for(self, provider: GPTModelProvider) -> tuple[Mapping, ...]:
        """The table for this provider: with tied embeddings the output layer mirrors the input embedding."""
        if not provider.share_embeddings_and_output_weights:
            return self.mappings
        embed = next(m for m in self.mappings if m.megatron == "embedding.word_embeddings.weight")
        tied = VocabParallel("output_layer.weight", embed.hf[0], export=False)
        return tuple(tied if m.megatron == "output_layer.weight" else m for m in self.mappings)

    def find(self, mappings: tuple[Mapping, ...], megatron_name: str) -> tuple[Mapping, str]:
        for mapping in mappings:
            layer = mapping.match(megatron_name)
            if layer is not None:
                return mapping, layer
        raise ValueError(f"no {self.hf_architecture} mapping for megatron parameter {megatron_name!r}; "
                         "is the model built by another family's provider?")

    def is_ignored(self, hf_name: str) -> bool:
        return any(fnmatch.fnmatchcase(hf_name, pattern) for pattern in self.ignore_hf)

    def tied_alias_problems(self, reader, targets: set[str]) -> list[str]:
        """A tied alias the checkpoint stores (``lm_head.weight``) must equal its target: with tied embeddings the
        alias is never read, so an output layer of its own would be dropped silently (transformers keeps it)."""
        problems = []
        for alias, target in self.tied_aliases.items():
            if alias in reader and target in targets and target in reader:
                ours, theirs = reader.get(alias), reader.get(target)
                if ours.shape != theirs.shape or ours.dtype != theirs.dtype or not torch.equal(ours, theirs):
                    problems.append(f"{alias} differs from {target}, but config.json ties them "
                                    "(tie_word_embeddings: true); if the output layer is its own, set "
                                    "tie_word_embeddings to false in config.json")
        return problems


def mapping_context(provider: GPTModelProvider, full_shape: tuple[int, ...] | None = None) -> MappingContext:
    return MappingContext(
        num_attention_heads=provider.num_attention_heads,
        num_query_groups=provider.num_query_groups or provider.num_attention_heads,
        head_dim=provider.kv_channels or provider.hidden_size // provider.num_attention_heads,
        hidden_size=provider.hidden_size,
        vocab_size=provider.vocab_size,
        full_shape=full_shape,
    )


# ------------------------------------------------------------------------------------- parameters
def _unwrap(chunk):
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def _local_to_global(chunk) -> dict[str, str]:
    """``decoder.layers.{local}.`` -> ``decoder.layers.{global}.`` for this chunk (megatron's layer_number is global)."""
    decoder = getattr(chunk, "decoder", None)
    return {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
            for i, layer in enumerate(getattr(decoder, "layers", []))}


def global_name(local_name: str, renames: dict[str, str]) -> str:
    for local, glob in renames.items():
        if local_name.startswith(local):
            return glob + local_name[len(local):]
    return local_name


def split_of(mapping: Mapping, param: torch.Tensor, tp_size: int) -> tuple[int, int] | None:
    """(dim, stride) along which ``param`` is split over TP, or None when every rank holds it whole."""
    if tp_size == 1 or mapping.tp == "replicated":
        return None
    if mapping.tp == "column":
        return 0, mapping.stride
    if mapping.tp == "row":
        return 1, 1
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return None


def shard(full: torch.Tensor, split: tuple[int, int] | None, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of ``full``: with stride s, its 1/size piece of each of the s blocks."""
    if split is None:
        return full
    dim, stride = split
    if full.shape[dim] % (size * stride):
        raise ValueError(f"cannot split dim {dim} of size {full.shape[dim]} into {size} TP x {stride} pieces")
    chunks = torch.chunk(full, size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def unshard(pieces: list[torch.Tensor], split: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`shard` over all ranks' pieces (in TP rank order)."""
    dim, stride = split
    blocks = [torch.chunk(p, stride, dim=dim) for p in pieces]
    return torch.cat([blocks[r][k] for k in range(stride) for r in range(len(pieces))], dim=dim)


@dataclass(frozen=True, slots=True)
class ParamTask:
    """One megatron parameter of the whole model, as every rank sees it after the table is gathered."""

    name: str
    pp_rank: int
    local_shape: tuple[int, ...]
    dtype: torch.dtype
    split: tuple[int, int] | None
    order: tuple

    def full_shape(self, tp_size: int) -> tuple[int, ...]:
        return full_shape(self.local_shape, self.split, tp_size)


def full_shape(local_shape: tuple[int, ...], split: tuple[int, int] | None, tp_size: int) -> tuple[int, ...]:
    """Shape of the whole tensor whose TP shard has ``local_shape``."""
    if split is None:
        return tuple(local_shape)
    shape = list(local_shape)
    shape[split[0]] *= tp_size
    return tuple(shape)


def _order_key(name: str, position: int) -> tuple:
    """Embedding first, then layers in global order, then the final norm and the output layer."""
    if name.startswith("embedding."):
        return (0, 0, position)
    if name.startswith("decoder.layers."):
        return (1, int(name.split(".")[2]), position)
    if name.startswith("decoder."):
        return (2, 0, position)
    return (3, 0, position)


def local_params(bridge: ModelBridge, provider: GPTModelProvider, chunks: list, tp_size: int):
    """Yield (global name, parameter, mapping, layer, split) for every parameter this rank holds.

    Parameters marked ``bridge_adapter`` (PEFT adapters attached by bridge-peft) are not part of the model's
    HF checkpoint and are skipped; bridge-peft exports them in the HF PEFT format.
    """
    mappings = bridge.mappings_for(provider)
    for chunk in chunks:
        module = _unwrap(chunk)
        renames = _local_to_global(module)
        for local_name, param in module.named_parameters():
            if getattr(param, "bridge_adapter", False):
                continue
            name = global_name(local_name, renames)
            mapping, layer = bridge.find(mappings, name)
            yield name, param, mapping, layer, split_of(mapping, param, tp_size)


def megatron_param_tasks(bridge: ModelBridge, provider: GPTModelProvider, chunks: list, state) -> list[ParamTask]:
    """Every parameter of the whole model (all PP stages / VP chunks), identically ordered on every rank."""
    mine = [
        ParamTask(name, state.pp_rank, tuple(param.shape), param.dtype, split, _order_key(name, i))
        for i, (name, param, _, _, split) in enumerate(local_params(bridge, provider, chunks, state.tp_size))
    ]
    if state.pp_size > 1:
        gathered: list[list[ParamTask] | None] = [None] * state.pp_size
        dist.all_gather_object(gathered, mine, group=state.pp_group)
        mine = [task for stage in gathered for task in stage]
    return sorted(mine, key=lambda t: t.order)


# ----------------------------------------------------------------------------------------- import
def load_hf_weights(bridge: ModelBridge, provider: GPTModelProvider, chunks: list, reader, state,
                    progress: bool = False) -> None:
    """Copy the HF checkpoint in ``reader`` into this rank's model chunks (its PP stage and TP slice).

    Raises:
        ValueError: listing every missing and unexpected HF tensor (checked on all ranks alike before anything
            is copied), or naming a parameter whose converted shape does not match.
    """
    tasks = megatron_param_tasks(bridge, provider, chunks, state)
    _check_checkpoint_names(bridge, provider, tasks, reader)
    params = list(local_params(bridge, provider, chunks, state.tp_size))
    iterator = params
    if progress and state.rank == 0:
        from tqdm.auto import tqdm

        iterator = tqdm(params, desc="Loading HF weights", unit="param")
    non_finite = NonFinite()
    with torch.no_grad():
        for name, param, mapping, layer, split in iterator:
            hf = [reader.get(n) for n in mapping.hf_names(layer)]
            expected = full_shape(tuple(param.shape), split, state.tp_size)
            full = mapping.to_megatron(hf, mapping_context(provider, expected))
            if tuple(full.shape) != expected:
                raise CheckpointMismatchError(
                    f"HF checkpoint {reader.path}: shape mismatch for {name} (from {mapping.hf_names(layer)}): the "
                    f"model needs {expected} for the full tensor, the checkpoint gives {tuple(full.shape)}")
            local = shard(full, split, state.tp_rank, state.tp_size).to(device=param.device, dtype=param.dtype)
            non_finite.check(local, dict(zip(mapping.hf_names(layer), hf)))
            if is_quantized_param(param):  # TE FP8 weights (fp8_param): a plain copy_ loses the load at step 1
                load_into_quantized(param, local)
            else:
                param.data.copy_(local)
    if dist.is_initialized() and dist.get_world_size() > 1:  # each rank loaded its own stage: all refuse together
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, non_finite.records())
        non_finite = NonFinite()
        for records in gathered:
            non_finite.merge(records)
    problem = non_finite.problem(f"HF checkpoint {reader.path}", "load",
                                 "params_dtype=bfloat16 or float32 (--dtype bfloat16)")
    if problem:
        raise ValueError(problem)


def _check_checkpoint_names(bridge: ModelBridge, provider: GPTModelProvider, tasks: list[ParamTask],
                            reader) -> None:
    mappings = bridge.mappings_for(provider)
    needed: set[str] = set()
    for task in tasks:
        mapping, layer = bridge.find(mappings, task.name)
        needed.update(mapping.hf_names(layer))
    present = set(reader.keys())
    allowed = set(needed)
    if provider.share_embeddings_and_output_weights:
        allowed.update(alias for alias, target in bridge.tied_aliases.items() if target in needed)
    missing = sorted(needed - present)
    unexpected = sorted(n for n in present - allowed if not bridge.is_ignored(n))
    if not missing and not unexpected and provider.share_embeddings_and_output_weights:
        tied = bridge.tied_alias_problems(reader, needed)
        if tied:
            raise CheckpointMismatchError(f"HF checkpoint {reader.path}: " + "; ".join(tied))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        raise CheckpointMismatchError(f"HF checkpoint {reader.path} does not match the {bridge.hf_architecture} "
                                      f"model built from its config:\n  " + "\n  ".join(lines))


# ----------------------------------------------------------------------------------------- export
def export_hf_shapes(bridge: ModelBridge, provider: GPTModelProvider, chunks: list, state
                     ) -> list[tuple[str, tuple[int, ...]]]:
    """``(hf_name, shape)`` of everything :func:`export_hf_weights` will yield, in the same order, computed on
    meta tensors (no data, no communication beyond the task-list gather)."""
    mappings = bridge.mappings_for(provider)
    out = []
    for task in megatron_param_tasks(bridge, provider, chunks, state):
        mapping, layer = bridge.find(mappings, task.name)
        if mapping.export:
            full = torch.empty(task.full_shape(state.tp_size), dtype=task.dtype, device="meta")
            ctx = mapping_context(provider, tuple(full.shape))
            out += [(n, tuple(t.shape)) for n, t in zip(mapping.hf_names(layer), mapping.to_hf(full, ctx))]
    return out


def export_hf_weights(bridge: ModelBridge, provider: GPTModelProvider, chunks: list, state, *,
                      cpu: bool = True, only: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(hf_name, full tensor)`` pairs of the whole model (``only``: of these megatron parameter names, e.g.
    ``{"output_layer.weight"}``); every rank must iterate to the end, with the same ``only``.

    All ranks take part in every collective in the same order (the task list is global), so any rank can consume
    the stream; usually only rank 0 writes it.
    """
    mappings = bridge.mappings_for(provider)
    tasks = [t for t in megatron_param_tasks(bridge, provider, chunks, state) if only is None or t.name in only]
    mine = {name: param for name, param, *_ in local_params(bridge, provider, chunks, state.tp_size)}
    pp_ranks = dist.get_process_group_ranks(state.pp_group) if state.pp_size > 1 else None
    for task in tasks:
        mapping, layer = bridge.find(mappings, task.name)
        if not mapping.export:
            continue
        full = None
        if task.pp_rank == state.pp_rank:
            param = mine[task.name]
            local = (param.dequantize() if is_quantized_param(param) else param).detach()  # TE FP8 weights: their values
            if task.split is not None and state.tp_size > 1:
                pieces = [torch.empty_like(local) for _ in range(state.tp_size)]
                dist.all_gather(pieces, local.contiguous(), group=state.tp_group)
                full = unshard(pieces, task.split)
            else:
                full = local
        if state.pp_size > 1:
            if full is None:
                full = torch.empty(task.full_shape(state.tp_size), dtype=task.dtype, device=state.device)
            else:
                full = full.contiguous()
            dist.broadcast(full, src=pp_ranks[task.pp_rank], group=state.pp_group)
        ctx = mapping_context(provider, tuple(full.shape))
        for hf_name, tensor in zip(mapping.hf_names(layer), mapping.to_hf(full, ctx)):
            yield hf_name, (tensor.cpu() if cpu else tensor)
