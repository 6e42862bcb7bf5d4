"""``NativeGPTModel``: megatron-core's ``GPTModel`` whose training loss never materialises the full logits.

Only the loss step changes. When ``labels`` are given on the last pipeline stage of a plain training or
evaluation forward, the output projection and the cross entropy run together through
:func:`.cross_entropy.fused_linear_cross_entropy` (per-token fp32 loss ``[b, s]``, the same contract as
``GPTModel.compute_language_model_loss``). Pass ``loss_mask`` to the forward (megatron's own ``pretrain_gpt``
does) and the gradients are computed during that forward; without it they are recomputed in backward.
Everything else (logits without labels, inference, multi-token prediction, MuP logit scaling, custom output
processors, fp16 cross entropy, an output layer with forward hooks such as an adapter) is ``GPTModel``'s own code
path.

Given a layer spec, ``GPTModel`` builds the decoder's final norm from megatron-core's module-global default
(``WrappedTorchNorm`` without TE / apex, which refuses sequence parallelism); ``NativeGPTModel`` builds it as a
:class:`.norm.NativeNorm` instead, same parameter ``decoder.final_layernorm.weight``.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import BaseTransformerLayer

from .cross_entropy import fused_linear_cross_entropy
from .norm import NativeNorm

__all__ = ["NativeGPTModel"]


class NativeGPTModel(GPTModel):
    """``GPTModel`` with the memory-lean fused output-projection + cross-entropy loss; same parameters."""

    def __init__(self, config, transformer_layer_spec, *args, **kwargs) -> None:
        if isinstance(transformer_layer_spec, ModuleSpec) and issubclass(transformer_layer_spec.module,
                                                                         BaseTransformerLayer):
            # What TransformerBlock would build from a layer spec, with the native final norm.
            pg_collection = kwargs.get("pg_collection")
            pp_rank = pg_collection.pp.rank() if getattr(pg_collection, "pp", None) is not None else None
            layers = get_num_layers_to_build(config, kwargs.get("vp_stage"), pp_rank)
            transformer_layer_spec = TransformerBlockSubmodules(layer_specs=[transformer_layer_spec] * layers,
                                                                layer_norm=NativeNorm)
        super().__init__(config, transformer_layer_spec, *args, **kwargs)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if not self._lean_loss_applies(labels, kwargs):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        hidden_states = self._output_layer_pre_hooks(hidden_states)
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        return fused_linear_cross_entropy(
            hidden_states, weight, labels, loss_weights=kwargs.get("loss_mask"), tp_group=self.tp_group,
            sequence_parallel=bool(self.output_layer.sequence_parallel),
        )

    def _output_layer_pre_hooks(self, hidden_states):
        """Run the output layer's forward pre-hooks, as calling it would: the fused loss reads its weight without
        calling it, and megatron-core's DDP waits there for the overlapped all-gather of that weight
        (``overlap_param_gather``)."""
        layer = self.output_layer
        for key, hook in list(layer._forward_pre_hooks.items()):
            if key in layer._forward_pre_hooks_with_kwargs:
                result = hook(layer, (hidden_states,), {})
                result = None if result is None else result[0]
            else:
                result = hook(layer, (hidden_states,))
            if result is not None:
                hidden_states = result[0] if isinstance(result, tuple) else result
        return hidden_states

    def _lean_loss_applies(self, labels, kwargs: dict) -> bool:
        from megatron.core.config_logger import has_config_logger_enabled
        from megatron.core.inference.utils import InferenceMode

        config = self.config
        return (
            self.post_process
            and labels is not None
            and not kwargs.get("mtp_in_postprocess")
            and not config.mtp_num_layers
            and kwargs.get("output_processor") is None
            and kwargs.get("inference_context") is None
            and kwargs.get("inference_params") is None
            and not InferenceMode.is_active()
            and not getattr(config, "use_mup", False)
            and not self.fp16_lm_cross_entropy
            and not getattr(config, "defer_embedding_wgrad_compute", False)
            and getattr(self.output_layer, "bias", None) is None
            # a forward hook on the output layer (e.g. a PEFT adapter on lm_head) must see its forward run
            and not self.output_layer._forward_hooks
            and not has_config_logger_enabled(config)
        )
