"""The native layer spec: megatron-core's local layer with torch-native fast kernels swapped in.

The module tree, parameter names, TP sharding and dist-checkpoint keys are exactly those of
``get_gpt_layer_local_spec(qk_layernorm=..., normalization=...)``: megatron-core's ``ColumnParallelLinear`` /
``RowParallelLinear`` for every projection, megatron's ``MLP`` (as :class:`NativeMLP`, whose fused SwiGLU is a
Triton kernel on CUDA), the same ``sharded_state_dict_keys_map``. Replaced are the pieces that make the local
spec slow and memory hungry: core attention (:class:`NativeDotProductAttention`, SDPA / FlexAttention), the RoPE
application (:class:`NativeSelfAttention`), the norms (:class:`NativeNorm`) and the SwiGLU kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from .attention import NativeDotProductAttention, NativeSelfAttention
from .norm import NativeNorm, recompute_output_for
from .swiglu import swiglu_into_consumer, swiglu_kernels_available

__all__ = ["NativeMLP", "NativeTransformerLayer", "get_native_layer_spec"]


class NativeMLP(MLP):
    """megatron-core's ``MLP`` (same parameters) with the native SwiGLU paths of :mod:`.swiglu`.

    For a gated SiLU MLP without biases, clamps, per-token scales, fp8 input store or CPU offloading:

    * ``bias_activation_fusion`` on a CUDA GPU: SwiGLU as one Triton kernel per direction;
    * ``recompute_activation_output`` (provider field, any device): the SwiGLU output is not kept for
      ``linear_fc2``'s backward but recomputed from fc1's output when that backward needs it.

    Every other case is ``MLP.forward`` itself.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = self.config
        self._native_swiglu = (
            config.gated_linear_unit
            and self.activation_func is F.silu
            and not config.use_te_activation_func
            and not config.add_bias_linear
            and getattr(config, "activation_func_clamp_value", None) is None
            and not getattr(config, "glu_linear_offset", 0.0)
            and not config.activation_func_fp8_input_store
            and not config.cpu_offloading
        )
        self._recompute_output = bool(getattr(config, "recompute_activation_output", False))

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        triton = (self.config.bias_activation_fusion and hidden_states.is_cuda and swiglu_kernels_available())
        if per_token_scale is not None or not self._native_swiglu or not (triton or self._recompute_output):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:  # cannot happen without add_bias_linear; keep megatron's semantics if it does
            intermediate = intermediate + bias
        return swiglu_into_consumer(intermediate, self.linear_fc2, triton=triton,
                                    recompute_output=self._recompute_output)


class NativeTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer``, compiled with ``torch.compile`` when ``config.compile_layers``.

    Compiling per layer (rather than the whole model) keeps compile time to one layer's graph, which every
    layer of the same shape reuses, and leaves megatron's pipeline schedules and DDP hooks outside the graph.

    ``recompute_granularity="selective"`` with ``"layernorm"`` in ``recompute_modules`` (megatron's option to
    drop the norm outputs and recompute them in backward) runs through :func:`.norm.recompute_output_for`
    instead of megatron-core's ``CheckpointWithoutOutput``, which needs Transformer Engine in megatron-core
    0.19 and a C++ extension compiled at first use: each norm's output is released after the linear layer that
    reads it (``linear_qkv``, ``linear_fc1``) and refilled just before that layer's backward.
    """

    def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs) -> None:
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        pairs = []
        if self.recompute_input_layernorm:
            pairs.append((self.input_layernorm, getattr(self.self_attention, "linear_qkv", None)))
        if self.recompute_pre_mlp_layernorm:
            pairs.append((self.pre_mlp_layernorm, getattr(self.mlp, "linear_fc1", None)))
        if pairs and not (config.fp8 or config.fp4):
            if getattr(config, "compile_layers", False):
                raise ValueError("the native spec's layernorm recompute releases storage from module hooks, which "
                                 "torch.compile cannot trace: drop 'layernorm' from recompute_modules or "
                                 "compile_layers")
            for norm, consumer in pairs:
                if not isinstance(norm, NativeNorm) or consumer is None:
                    raise ValueError("layernorm recompute in the native layer needs its NativeNorm followed by a "
                                     f"linear layer, got {type(norm).__name__} -> {type(consumer).__name__}")
                recompute_output_for(norm, consumer)
            self.recompute_input_layernorm = self.recompute_pre_mlp_layernorm = False
        if getattr(config, "compile_layers", False):
            self.compile()


def get_native_layer_spec(config) -> ModuleSpec:
    """The ``TransformerLayer`` spec of the native implementation for ``config`` (a TransformerConfig).

    Starts from megatron-core's own local submodules (so the MLP, bias-dropout-add, linear layers and the
    checkpoint key map are whatever this megatron-core version builds for the local spec) and swaps in the
    native norm, self-attention and core attention. Reads ``qk_layernorm`` / ``qk_l2_norm`` (Qwen3-style q/k
    norms) and ``normalization`` from the config.

    Raises:
        ValueError: for a mixture-of-experts or multi-latent-attention config (not covered by this spec).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    if getattr(config, "num_moe_experts", None):
        raise ValueError("the native spec covers dense models only (num_moe_experts is set); "
                         "use transformer_impl='local' or 'transformer_engine'")
    if getattr(config, "multi_latent_attention", False):
        raise ValueError("the native spec has no multi-latent attention; use transformer_impl='local'")
    qk_layernorm = bool(getattr(config, "qk_layernorm", False))
    qk_l2_norm = bool(getattr(config, "qk_l2_norm", False))
    local = get_gpt_layer_local_submodules(qk_layernorm=qk_layernorm, normalization=config.normalization,
                                           qk_l2_norm=qk_l2_norm)
    attention = local.self_attention
    attention_submodules = dataclasses.replace(
        attention.submodules,
        core_attention=NativeDotProductAttention,
        q_layernorm=NativeNorm if qk_layernorm and not qk_l2_norm else attention.submodules.q_layernorm,
        k_layernorm=NativeNorm if qk_layernorm and not qk_l2_norm else attention.submodules.k_layernorm,
    )
    mlp = local.mlp
    if isinstance(mlp, functools.partial) and mlp.func == MLP.as_mlp_submodule:
        mlp = functools.partial(NativeMLP.as_mlp_submodule, *mlp.args, **mlp.keywords)
    submodules = dataclasses.replace(
        local,
        mlp=mlp,
        input_layernorm=NativeNorm,
        pre_mlp_layernorm=NativeNorm,
        self_attention=ModuleSpec(module=NativeSelfAttention, params=dict(attention.params),
                                  submodules=attention_submodules),
    )
    return ModuleSpec(module=NativeTransformerLayer, submodules=submodules)
