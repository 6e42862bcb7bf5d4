"""Layer specs: which modules a GPT transformer layer is built from.

- ``transformer_engine``: megatron-core's TE spec (fused layernorm-linear, TE attention, FP8/FP4 capable).
- ``native``: megatron-core modules with torch-native fast kernels (see :mod:`bridge_convert.native`).
- ``local``: megatron-core's plain reference modules.

All three produce the same parameter names for conversion (the TE spec stores the pre-attention / pre-MLP norms as
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``; the bridges map both spellings).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec

__all__ = ["TRANSFORMER_IMPLS", "layer_spec", "resolve_transformer_impl", "te_available",
           "transformer_engine_status"]

TRANSFORMER_IMPLS = ("native", "local", "transformer_engine")


@cache
def transformer_engine_status() -> tuple[bool, str]:
    """Whether Transformer Engine's torch extension imports: ``(True, version)`` or ``(False, the import error)``.

    The one probe of TE in the repository (the layer specs and the FP8/FP4 config checks both ask it). Any
    exception counts as absent: a partial or CUDA-mismatched TE install raises RuntimeError / OSError, not
    ImportError. Cached: importing TE is slow and its answer cannot change within a process.
    """
    try:
        import transformer_engine as te
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return False, f"{type(err).__name__}: {err}"
    return True, str(getattr(te, "__version__", "unknown"))


def te_available() -> bool:
    """True when a CUDA GPU is present and Transformer Engine imports (what the TE layer spec needs)."""
    return torch.cuda.is_available() and transformer_engine_status()[0]


def resolve_transformer_impl(requested: str) -> str:
    """Turn ``auto`` into a concrete implementation and check that the requested one can run here.

    Raises:
        ValueError: for an unknown name, or ``transformer_engine`` without TE or without a GPU.
    """
    if requested == "auto":
        return "transformer_engine" if te_available() else "native"
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl must be one of {('auto', *TRANSFORMER_IMPLS)}, got {requested!r}")
    if requested == "transformer_engine" and not te_available():
        raise ValueError(
            "transformer_impl='transformer_engine' needs Transformer Engine and a CUDA GPU; "
            "install the `te` extra on a GPU machine, or use transformer_impl='native'"
        )
    return requested


def layer_spec(config, vp_stage: int | None = None) -> ModuleSpec:
    """The transformer-layer spec for ``config`` (a finalized provider) and its ``transformer_impl``."""
    impl = resolve_transformer_impl(config.transformer_impl)
    qk_layernorm = bool(getattr(config, "qk_layernorm", False))
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    if impl == "native":
        from .native import get_native_layer_spec

        return get_native_layer_spec(config)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=config.normalization)
