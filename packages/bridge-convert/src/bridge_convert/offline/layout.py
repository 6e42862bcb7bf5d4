"""Where each megatron-core parameter lives in a torch_dist checkpoint of a GPTModel, derived from a mapping table.

megatron-core's ``GPTModel.sharded_state_dict`` (at any TP / PP / VP layout) keys every parameter by its global
name with the layer index taken out: the weights of all decoder layers form one tensor with a prepended layer axis
(``decoder.layers.mlp.linear_fc1.weight`` of shape ``(num_layers, 2 * ffn, hidden)``), the others keep their own
name and (vocab-padded) shape. Norms fused into the following linear are saved under the fused name whatever the
layer spec (the local spec maps ``input_layernorm.`` / ``pre_mlp_layernorm.`` to them), a tied output layer is not
saved at all, and every linear module of a layer adds an ``_extra_state`` object. A fused gated-MLP weight is saved
as its gate and up halves (megatron-core's swiglu sharded factory), which is the mapping's ``stride``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from ..mappings import DEFAULT_VOCAB_DIVISOR, Mapping, VocabParallel, padded_vocab_size
from ..model_bridge import ModelBridge, mapping_context

__all__ = ["LAYER_PREFIX", "CheckpointEntry", "checkpoint_entries", "extra_state_keys", "model_config"]

LAYER_PREFIX = "decoder.layers."
CHECKPOINT_KEY_MAP = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                      "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
"""megatron-core's local layer spec ``sharded_state_dict_keys_map``: the checkpoint names of unfused norms."""


def model_config(bridge: ModelBridge, hf_config: dict[str, Any]) -> SimpleNamespace:
    """The provider fields of this HF config (``config_to_provider``, pure), as attributes; no megatron-core."""
    return SimpleNamespace(**bridge.config_to_provider(hf_config))


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint tensor: its key, the mapping that makes it, and whether it stacks the decoder layers."""

    key: str
    mapping: Mapping
    layered: bool

    def hf_names(self, layer: int | None) -> list[str]:
        return self.mapping.hf_names("" if layer is None else str(layer))

    def megatron_shape(self, hf_shapes: list[tuple[int, ...]], cfg: SimpleNamespace) -> tuple[int, ...]:
        """The full (per-layer) megatron tensor shape the mapping makes of HF tensors of these shapes.

        Raises:
            ValueError: when the mapping refuses the shapes (QKV rows, gate/up mismatch, vocab rows).
        """
        meta = [torch.empty(shape, device="meta") for shape in hf_shapes]
        return tuple(self.mapping.to_megatron(meta, self.context(cfg, hf_shapes)).shape)

    def hf_shapes(self, megatron_shape: tuple[int, ...], cfg: SimpleNamespace) -> list[tuple[int, ...]]:
        """The HF tensor shapes the mapping makes of a megatron tensor of ``megatron_shape``.

        Only views and copies run on the meta tensors here, while ``torch.cat`` on meta tensors
        (:meth:`megatron_shape`) imports ``torch._dynamo`` (1-3 s): the import checks HF shapes against these first.
        """
        outs = self.mapping.to_hf(torch.empty(megatron_shape, device="meta"),
                                  self.context(cfg, megatron_shape=tuple(megatron_shape)))
        return [tuple(t.shape) for t in outs]

    def context(self, cfg: SimpleNamespace, hf_shapes: list[tuple[int, ...]] | None = None,
                megatron_shape: tuple[int, ...] | None = None):
        """The mapping context; vocab tables are padded as megatron-core pads them at TP=1."""
        if megatron_shape is None and isinstance(self.mapping, VocabParallel) and hf_shapes:
            rows = padded_vocab_size(cfg.vocab_size, DEFAULT_VOCAB_DIVISOR, 1)
            megatron_shape = (rows, *hf_shapes[0][1:])
        return mapping_context(cfg, megatron_shape)


def checkpoint_entries(bridge: ModelBridge, cfg: SimpleNamespace) -> list[CheckpointEntry]:
    """The saved tensors of this model, in megatron-core's order (embedding, layers, final norm, output layer)."""
    entries: dict[str, CheckpointEntry] = {}
    layer_pattern = LAYER_PREFIX + "*."
    for mapping in bridge.mappings_for(cfg):
        if not mapping.export:
            continue  # mirrors another parameter (a tied output layer): megatron-core does not save it
        if "*" in mapping.megatron:
            if not mapping.megatron.startswith(layer_pattern):
                raise ValueError(f"mapping {mapping.megatron!r}: layer patterns must start with {layer_pattern!r}")
            rest = mapping.megatron[len(layer_pattern):]
            for old, new in CHECKPOINT_KEY_MAP.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
            key, layered = LAYER_PREFIX + rest, True
        else:
            key, layered = mapping.megatron, False
        entries.setdefault(key, CheckpointEntry(key, mapping, layered))
    order = {"embedding": 0, "decoder": 2, "output_layer": 3}
    return sorted(entries.values(), key=lambda e: 1 if e.layered else order.get(e.key.split(".")[0], 3))


def extra_state_keys(entries: list[CheckpointEntry], num_layers: int) -> list[str]:
    """The ``_extra_state`` object keys of the layers' linear modules (``.../shard_<layer>_<num_layers>``)."""
    modules = []
    for entry in entries:
        module = entry.key.rsplit(".", 1)[0]
        if entry.layered and module.rsplit(".", 1)[-1].startswith("linear_") and module not in modules:
            modules.append(module)
    return [f"{module}._extra_state/shard_{layer}_{num_layers}" for layer in range(num_layers) for module in modules]


def expected_megatron_shapes(cfg: SimpleNamespace) -> dict[str, tuple[int, ...]]:
    """Per-layer / whole shapes of a dense GPTModel's parameters at TP=1 (megatron-core's module shapes)."""
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    groups = cfg.num_query_groups or heads
    head_dim = cfg.kv_channels or hidden // heads
    qkv = (heads + 2 * groups) * head_dim
    ffn = cfg.ffn_hidden_size * (2 if cfg.gated_linear_unit else 1)
    vocab = padded_vocab_size(cfg.vocab_size, DEFAULT_VOCAB_DIVISOR, 1)
    layer = LAYER_PREFIX
    return {
        "embedding.word_embeddings.weight": (vocab, hidden), "output_layer.weight": (vocab, hidden),
        "decoder.final_layernorm.weight": (hidden,),
        layer + "self_attention.linear_qkv.layer_norm_weight": (hidden,),
        layer + "self_attention.linear_qkv.weight": (qkv, hidden), layer + "self_attention.linear_qkv.bias": (qkv,),
        layer + "self_attention.linear_proj.weight": (hidden, heads * head_dim),
        layer + "self_attention.q_layernorm.weight": (head_dim,),
        layer + "self_attention.k_layernorm.weight": (head_dim,),
        layer + "mlp.linear_fc1.layer_norm_weight": (hidden,),
        layer + "mlp.linear_fc1.weight": (ffn, hidden), layer + "mlp.linear_fc2.weight": (hidden, cfg.ffn_hidden_size),
    }
