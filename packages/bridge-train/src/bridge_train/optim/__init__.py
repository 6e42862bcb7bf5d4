"""The optimizer step: fused / multi-tensor kernels for megatron-core's optimizer when TE and apex are absent.

megatron-core builds the optimizer (``get_megatron_optimizer``); :func:`use_fused_optimizer_kernels` then makes
its step cheap on a GPU without Transformer Engine or apex (see :mod:`.fused_step`). Imports nothing heavy:
megatron-core and Triton are imported by the functions that need them.
"""

from .fused_step import fused_adam_step, use_fused_optimizer_kernels

__all__ = ["fused_adam_step", "use_fused_optimizer_kernels"]
