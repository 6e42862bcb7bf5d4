"""The PEFT base class: find target layers, attach adapters, freeze the base, report and save adapter state.

A PEFT method is a kw-only dataclass (so configs round-trip through YAML and take dotted overrides such as
``peft.dim=16``) whose :meth:`PEFT.make_adapter` builds the adapter module of one matched linear layer. Calling
the method on a model (a list of model chunks, as ``bridge.to_megatron_model`` and megatron-core's
``provide_distributed_model`` give) attaches the adapters and freezes everything else; that call is the
``peft(model, training)`` protocol bridge-train applies before DDP wrapping and before the optimizer is built,
so DDP's gradient buffers and the optimizer (and its fp32 master weights) hold adapter parameters only.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .linear import ADAPTER_ATTR, AdapterModule, adapted_linears, attach_adapter, is_adapter_state_key
from .matching import check_patterns, matches, matching_patterns

__all__ = ["PEFT", "global_module_names", "model_chunks"]

# HF peft's module names -> megatron-core's (the fused layer, and CanonicalLoRA's per-projection name), for messages
_HF_NAMES = {"q_proj": "linear_qkv / linear_q", "k_proj": "linear_qkv / linear_k", "v_proj": "linear_qkv / linear_v",
             "o_proj": "linear_proj", "gate_proj": "linear_fc1 / linear_fc1_gate", "up_proj": "linear_fc1 / linear_fc1_up",
             "down_proj": "linear_fc2"}

DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

_FUSED_PARTS = {"linear_qkv": ("linear_q", "linear_k", "linear_v"), "linear_fc1": ("linear_fc1_gate", "linear_fc1_up")}


def model_chunks(model) -> tuple[list, bool]:
    """``(chunks, was_list)``: a model given as one module or as a list of chunks."""
    if isinstance(model, list | tuple):
        return list(model), True
    return [model], False


def _unwrap(chunk):
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def global_module_names(chunk) -> list[tuple[str, str, nn.Module]]:
    """``(global name, local name, module)`` of every module of one chunk; layer numbers are megatron-core's
    global ``layer_number - 1`` so patterns mean the same layers at any pipeline layout."""
    from bridge_convert.model_bridge import _local_to_global, global_name

    module = _unwrap(chunk)
    renames = _local_to_global(module)
    return [(global_name(local + ".", renames)[:-1] if local else "", local, sub)
            for local, sub in module.named_modules()]


def _is_parallel_linear(module: nn.Module) -> bool:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return isinstance(module, ColumnParallelLinear | RowParallelLinear) or \
        getattr(module, "parallel_mode", None) in ("column", "row")


def _all_reduce_counts(counts: list[int]) -> list[int]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1 or not counts:
        return counts
    # on the device the default group communicates on: an NCCL group has no CPU backend
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _gather_messages(messages: list[str]) -> list[str]:
    """Every rank's messages, on every rank (so all ranks raise together)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return messages
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, messages)
    return list(dict.fromkeys(m for rank in gathered for m in rank))


_LAYER_NAME = re.compile(r"^(.*\blayers)\.(\d+)\.(.+)$")


def _num_layers(chunks) -> int | None:
    config = getattr(_unwrap(chunks[0]), "config", None) if chunks else None
    return getattr(config, "num_layers", None)


def _adapted_in_every_layer(names: list[str], num_layers: int | None):
    """``stacked(name)``: whether the layer module ``name`` (``decoder.layers.3.mlp.linear_fc1``) has an adapter in
    every layer of the model, on some rank. Checkpoints stack a layer's tensors over all layers (megatron-core's
    layout, one tensor per module path); adapters on some layers only are saved per layer instead."""
    parts = [m.groups() for m in map(_LAYER_NAME.match, names) if m]
    seen = _gather_messages([f"{stem}|{suffix}|{index}" for stem, index, suffix in parts])
    layers: dict[tuple[str, str], set[str]] = {}
    for entry in seen:
        stem, suffix, index = entry.split("|")
        layers.setdefault((stem, suffix), set()).add(index)

    def stacked(name: str) -> bool:
        match = _LAYER_NAME.match(name)
        if match is None or num_layers is None:
            return True
        stem, _, suffix = match.groups()
        return len(layers.get((stem, suffix), ())) == num_layers

    return stacked


_RECOMPUTE_HOOK = "_bridge_peft_recompute_hook"


def _embedding_output_needs_grad(module, inputs, output):
    """Forward hook on the (frozen) embedding of a model with adapters: under full activation recompute,
    megatron-core's reentrant checkpoint runs the layers in a custom autograd function whose outputs need grad only
    if its input does; with the base frozen the embedding output does not, so the layers' backward (hence every
    adapter gradient inside them) would never run. The output is marked to need grad then, as HF's
    ``enable_input_require_grads`` does for gradient checkpointing."""
    config = getattr(module, "config", None)
    if (torch.is_grad_enabled() and getattr(config, "recompute_granularity", None) == "full"
            and isinstance(output, torch.Tensor) and not output.requires_grad):
        output.requires_grad_(True)
    return output


@dataclass(kw_only=True)
class PEFT:
    """Base class of PEFT methods; subclasses implement :meth:`make_adapter`.

    Args:
        target_modules: names or patterns (see :mod:`bridge_peft.matching`) of the linear layers to adapt.
            Every entry must match at least one layer of the model.
        exclude_modules: names or patterns of layers to leave alone even when a target matches them; every
            entry must match at least one linear layer (a misspelled one excluded nothing).
    """

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------- subclass API
    def validate(self) -> None:
        """Check the settings (also run when the method is applied: dotted overrides bypass ``__init__``).

        Raises:
            ValueError: naming the field, its value and what is allowed.
        """
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]
        self.target_modules = list(self.target_modules)
        self.exclude_modules = list(self.exclude_modules)
        if not self.target_modules:
            raise ValueError(f"{type(self).__name__}.target_modules is empty: name at least one linear layer, "
                             f"e.g. {list(DEFAULT_TARGETS)}")
        check_patterns(self.target_modules, f"{type(self).__name__}.target_modules")
        check_patterns(self.exclude_modules, f"{type(self).__name__}.exclude_modules")

    def targets(self, name: str, module: nn.Module) -> list[tuple[str, str]]:
        """``(pattern, projection)`` pairs by which this layer is targeted; projection ``all`` = the whole layer.
        ``module`` is None when only names are checked (:meth:`check_target_names`).

        Subclasses that adapt parts of a fused layer (canonical LoRA) override this.
        """
        return [(p, "all") for p in matching_patterns(name, self.target_modules)]

    def make_adapter(self, module: nn.Module, name: str, projections: tuple[str, ...]) -> AdapterModule:
        """The adapter for the linear layer ``module`` (global ``name``), adapting ``projections``."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_adapter()")

    # ---------------------------------------------------------------------------------- applying
    def __call__(self, model, training: bool = True):
        """Attach adapters to the matched layers of ``model`` (list of chunks or one module) and freeze the base.

        Returns the same list (or module). ``training=True`` puts the chunks in train mode; with ``training=False``
        nothing is trainable and the chunks are put in eval mode (inference / export: no adapter dropout), as HF
        peft's ``from_pretrained(is_trainable=False)`` does.

        Raises:
            ValueError: for a target pattern that matches no layer of the model (all ranks agree), bad
                settings, or a model that already has adapters.
        """
        self.validate()
        chunks, was_list = model_chunks(model)
        plan = self._plan(chunks)
        adapters = [self.make_adapter(module, name, projections) for module, name, projections in plan]
        stacked = _adapted_in_every_layer([name for _, name, _ in plan], _num_layers(chunks))
        for (module, name, _), adapter in zip(plan, adapters):  # attached only once every adapter could be made
            adapter.layer_stacked = stacked(name)
            attach_adapter(module, adapter)
        for chunk in chunks:
            chunk.train(training)
            for param in _unwrap(chunk).parameters():
                param.requires_grad_(bool(training and getattr(param, "bridge_adapter", False)))
            embedding = getattr(_unwrap(chunk), "embedding", None)
            if training and embedding is not None and not hasattr(embedding, _RECOMPUTE_HOOK):
                setattr(embedding, _RECOMPUTE_HOOK, embedding.register_forward_hook(_embedding_output_needs_grad))
        return model  # the same list (or module), now with adapters

    def check_target_names(self, names: list[str]) -> None:
        """Raise what applying would raise for targets that match none of the linear layer ``names`` (global names,
        e.g. :func:`bridge_peft.matching.linear_layer_names` of a model provider): a check by name alone, before
        any model is built (``bridge-run --dry-run`` runs it). Layers refused for other reasons (a tied output
        layer) are found only when applying. A subclass overriding :meth:`targets` outside bridge-peft may need
        the module itself, so its targets are checked when it is applied only.

        Raises:
            ValueError: as :meth:`__call__` for bad settings or targets matching no layer.
        """
        self.validate()
        if type(self).targets.__module__.split(".")[0] != "bridge_peft":
            return
        hits = dict.fromkeys(self.target_modules, 0)
        excluded = dict.fromkeys(self.exclude_modules, 0)
        kept = 0
        for name in names:
            found = self.targets(name, None)
            for pattern, _ in found:
                hits[pattern] += 1
            for pattern in excluded:
                excluded[pattern] += matches(name, [pattern])
            kept += bool(found) and not matches(name, self.exclude_modules)
        self._raise_unmatched([p for p, n in hits.items() if n == 0], names)
        self._raise_unmatched([p for p, n in excluded.items() if n == 0], names, field="exclude_modules")
        self._raise_all_excluded(kept)

    def _raise_all_excluded(self, kept: int) -> None:
        if not kept:
            raise ValueError(f"{type(self).__name__}: exclude_modules {self.exclude_modules} removes every layer "
                             f"target_modules {self.target_modules} matches: nothing would be adapted (and nothing "
                             "trained)")

    def _raise_unmatched(self, missing: list[str], linear_names: list[str], field: str = "target_modules") -> None:
        if not missing:
            return
        examples = ", ".join(sorted(set(linear_names))[:6]) or "none on this rank"
        hf = {m: _HF_NAMES[m] for m in missing if m in _HF_NAMES}
        hint = (f"; {list(hf)} are HF names: megatron's are {hf} (LoRA / DoRA adapt the fused linear_qkv and "
                "linear_fc1 whole; CanonicalLoRA adapts linear_q / linear_k / linear_v / linear_fc1_gate / "
                "linear_fc1_up separately)") if hf else ""
        fused = [m for m in missing if m.rpartition(".")[2] in _FUSED_PARTS]
        if fused and type(self).targets is not PEFT.targets:  # a method adapting the parts of fused layers
            hint += (f"; {fused} are fused layers, which {type(self).__name__} targets by their parts: "
                     + ", ".join(f"{m.rpartition('.')[2]} -> {' / '.join(_FUSED_PARTS[m.rpartition('.')[2]])}"
                                 for m in fused))
        raise ValueError(f"{type(self).__name__}.{field} {missing} match no linear layer of the model "
                         f"(linear layers are named like: {examples}); fix the name or pattern{hint}")

    def check_targets(self, model) -> None:
        """Raise what applying would raise for these settings and targets on ``model``, attaching nothing: bridge-
        train runs it on the fresh model, before the pretrained weights load (a misspelled target fails in
        seconds, not after a 70B load). Every rank calls it.

        Raises:
            ValueError: as :meth:`__call__` for bad settings, targets matching no layer, or refused layers.
        """
        self.validate()
        self.check_trainable([module for module, _, _ in self._plan(model_chunks(model)[0])])

    def check_trainable(self, modules: list[nn.Module]) -> None:
        """Raise for settings megatron-core's optimizer cannot train on these layers (:meth:`check_targets` runs
        it; applying does not: another optimizer may take them); a method whose adapters have a dtype of their
        own checks it here.

        Raises:
            ValueError: naming the setting and the fix.
        """

    def _plan(self, chunks: list) -> list[tuple[nn.Module, str, tuple[str, ...]]]:
        """``(module, global name, projections)`` of every layer to adapt; raises for refused or unmatched targets."""
        plan: list[tuple[nn.Module, str, tuple[str, ...]]] = []
        hits = dict.fromkeys(self.target_modules, 0)
        excluded = dict.fromkeys(self.exclude_modules, 0)
        linear_names: list[str] = []
        refused: list[str] = []
        for chunk in chunks:
            tied = bool(getattr(_unwrap(chunk), "share_embeddings_and_output_weights", False))
            for name, _, module in global_module_names(chunk):
                if not _is_parallel_linear(module):
                    continue
                linear_names.append(name)
                for pattern in excluded:
                    excluded[pattern] += matches(name, [pattern])
                if hasattr(module, ADAPTER_ATTR):
                    raise ValueError(f"{name} already has an adapter: apply a PEFT method to a model only once")
                found = self.targets(name, module)
                for pattern, _ in found:
                    hits[pattern] += 1
                if found and not matches(name, self.exclude_modules):
                    if tied and name == "output_layer":  # PP=1: no weight of its own; PP>1: a synced copy
                        refused.append("output_layer shares its weight with the embedding (tied embeddings): an "
                                       "adapter there would change the embedding when merged; add 'output_layer' "
                                       "to exclude_modules or choose other targets")
                        continue
                    projections = tuple(dict.fromkeys(p for _, p in found))
                    plan.append((module, name, projections))
        refused = _gather_messages(refused)  # the output layer lives on the last pipeline stage only
        if refused:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(refused))
        totals = _all_reduce_counts([*hits.values(), *excluded.values(), len(plan)])
        self._raise_unmatched([p for p, n in zip(hits, totals) if n == 0], linear_names)
        self._raise_unmatched([p for p, n in zip(excluded, totals[len(hits):]) if n == 0], linear_names,
                              field="exclude_modules")
        self._raise_all_excluded(totals[-1])
        return plan

    # ------------------------------------------------------------------------------- inspection
    @staticmethod
    def trainable_parameters(model) -> list[torch.nn.Parameter]:
        """The parameters the optimizer should see (this rank's; adapter parameters after applying)."""
        chunks, _ = model_chunks(model)
        return [p for c in chunks for p in _unwrap(c).parameters() if p.requires_grad]

    @staticmethod
    def parameter_counts(model) -> dict[str, int]:
        """``{"trainable": n, "total": n}`` parameters held by this rank (TP shards count their local size)."""
        chunks, _ = model_chunks(model)
        params = [p for c in chunks for p in _unwrap(c).parameters()]
        return {"trainable": sum(p.numel() for p in params if p.requires_grad),
                "total": sum(p.numel() for p in params)}

    @staticmethod
    def adapter_state_dict(model) -> dict[str, torch.Tensor]:
        """Adapter tensors only (this rank's shards), keyed by global module names."""
        chunks, _ = model_chunks(model)
        out: dict[str, torch.Tensor] = {}
        for chunk in chunks:
            for name, _, module in global_module_names(chunk):
                if isinstance(module, AdapterModule):
                    for key, tensor in module.state_dict(keep_vars=False).items():
                        out[f"{name}.{key}"] = tensor.detach().clone()
        return out

    @staticmethod
    def load_adapter_state_dict(model, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`adapter_state_dict` returned (same layout).

        Raises:
            ValueError: naming missing / unexpected keys or a shape mismatch.
        """
        chunks, _ = model_chunks(model)
        merged = [name for chunk in chunks for name, _, module in global_module_names(chunk)
                  if isinstance(module, AdapterModule) and getattr(module, "merged", False)]
        if merged:  # unmerge would then subtract the new values' delta, not the merged one
            raise ValueError(f"the adapters are merged into the weights ({merged[0]}, ...): unmerge them "
                             "(PEFT.unmerge(model)) before loading other adapter values")
        mine = PEFT.adapter_state_dict(chunks)
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing or unexpected:
            raise ValueError(f"adapter state does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for chunk in chunks:
            for name, _, module in global_module_names(chunk):
                if isinstance(module, AdapterModule):
                    own = module.state_dict(keep_vars=True)
                    with torch.no_grad():
                        for key, tensor in own.items():
                            src = state[f"{name}.{key}"]
                            if tuple(src.shape) != tuple(tensor.shape):
                                raise ValueError(f"{name}.{key}: shape {tuple(src.shape)} does not match the "
                                                 f"adapter's {tuple(tensor.shape)}")
                            tensor.copy_(src)

    @staticmethod
    def filter_sharded_state_dict(sharded: dict[str, Any]) -> dict[str, Any]:
        """Keep only adapter entries of a (nested) megatron sharded state dict: an adapter-only checkpoint.

        The top-level entries (``model``, ``model0``.. one per model chunk) stay, empty where a chunk has no
        adapters (a pipeline stage without adapted layers): loading expects one entry per chunk."""
        return {key: PEFT._adapter_entries(value) if isinstance(value, dict) else value
                for key, value in sharded.items() if isinstance(value, dict) or is_adapter_state_key(key)}

    @staticmethod
    def _adapter_entries(sharded: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in sharded.items():
            if isinstance(value, dict):
                kept = PEFT._adapter_entries(value)
                if kept:
                    out[key] = kept
            elif is_adapter_state_key(key):
                out[key] = value
        return out

    # ------------------------------------------------------------------------------- merge etc.
    @staticmethod
    def merge(model) -> None:
        """Fold every adapter into its base weight (see :func:`bridge_peft.merge_adapters`)."""
        from .merge import merge_adapters

        merge_adapters(model)

    @staticmethod
    def unmerge(model) -> None:
        from .merge import unmerge_adapters

        unmerge_adapters(model)

    @staticmethod
    @contextmanager
    def disabled(model):
        from .merge import adapters_disabled

        with adapters_disabled(model):
            yield


def adapters_of(model) -> list[tuple[nn.Module, AdapterModule]]:
    """``(linear layer, adapter)`` for every adapter of the model's chunks on this rank."""
    chunks, _ = model_chunks(model)
    return [(linear, adapter) for c in chunks for _, linear, adapter in adapted_linears(_unwrap(c))]
