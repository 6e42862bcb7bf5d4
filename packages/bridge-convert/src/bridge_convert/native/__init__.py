"""The ``native`` transformer implementation: megatron-core modules with torch-native fast kernels.

Selected by ``GPTModelProvider(transformer_impl="native")`` (and by ``"auto"`` when Transformer Engine is absent).
Same parameter names, TP sharding and dist-checkpoint keys as megatron-core's local spec; what it uses:

==================  =========================================================  ===============================
piece               on a CUDA GPU                                              on CPU
==================  =========================================================  ===============================
core attention      SDPA (flash / cuDNN / efficient), GQA in place             SDPA's fused CPU kernel
packed docs, SWA    FlexAttention block masks (compiled)                       SDPA with a dense bool mask
RMSNorm             liger-kernel's Triton RMSNorm if it imports, else          ``torch.rms_norm``
                    ``torch.rms_norm`` (torch's fused CUDA kernel)
  its output        kept for the next linear layer's backward, or with         same
                    ``recompute_modules=["layernorm"]`` released and refilled
RoPE                one ``torch.compile``'d kernel per q / k, per-document     megatron's arithmetic, eager
                    positions for packed rows
SwiGLU              one Triton kernel forward, one backward (in place),        megatron-core's MLP code
                    with ``bias_activation_fusion`` (:class:`NativeMLP`)
  its output        kept for fc2's backward, or with ``recompute_activation_output`` released and recomputed
                    just before it (any device)
weight gradients    accumulated into DDP's fp32 ``main_grad`` in the GEMM      fp32 ``addmm_``
                    (``gradient_accumulation_fusion``; :mod:`.wgrad`)
loss                chunked fused output projection + vocab-parallel CE        same, eager
                    (compiled elementwise), gradients in the forward pass
whole layer         ``torch.compile`` per layer when ``compile_layers``        same (slow to compile)
==================  =========================================================  ===============================

Packed sequences take megatron-core's ``PackedSeqParams(qkv_format="thd", cu_seqlens_q=..., max_seqlen_q=...)``
with one packed row per micro-batch (input ids ``[1, T]``), as GPTModel and TE expect; several rows are packed by
flattening them into one row and concatenating their ``cu_seqlens``.

The optimizer step's kernels are training, not model code: they live in ``bridge_train.optim``.
"""

from .attention import NativeDotProductAttention, NativeSelfAttention
from .cross_entropy import fused_linear_cross_entropy
from .masks import PackedLayout, packed_layout
from .model import NativeGPTModel
from .norm import NativeNorm
from .spec import NativeMLP, NativeTransformerLayer, get_native_layer_spec
from .wgrad import install_torch_wgrad_accumulation

__all__ = [
    "NativeDotProductAttention",
    "NativeGPTModel",
    "NativeMLP",
    "NativeNorm",
    "NativeSelfAttention",
    "NativeTransformerLayer",
    "PackedLayout",
    "fused_linear_cross_entropy",
    "get_native_layer_spec",
    "install_torch_wgrad_accumulation",
    "packed_layout",
]
