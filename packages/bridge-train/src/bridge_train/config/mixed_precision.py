"""Mixed-precision recipes: named bundles of the precision fields of the model, optimizer and DDP configs.

A recipe is a named set of field values (``MIXED_PRECISION_RECIPES["bf16_mixed"]()`` builds it);
:func:`get_mixed_precision_config` resolves a name in underscore or hyphen form. :meth:`MixedPrecisionConfig.apply` copies the fields onto the
megatron-core configs (names checked against megatron-core 0.19's TransformerConfig, OptimizerConfig and
DistributedDataParallelConfig). FP8 and FP4 run through Transformer Engine on capable GPUs only;
:func:`quantization_support_problems` says what is missing on this machine.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from bridge_convert.dtypes import dtype_name as _name
from bridge_convert.specs import transformer_engine_status

from .errors import unknown_name_message
from .fields import at_least, type_problems

__all__ = [
    "MIXED_PRECISION_RECIPES",
    "MixedPrecisionConfig",
    "get_mixed_precision_config",
    "quantization_support_problems",
]

logger = logging.getLogger(__name__)

@dataclass(kw_only=True, slots=True)
class MixedPrecisionConfig:
    """Precision settings applied to the model, optimizer and DDP configs by :meth:`apply`."""

    name: str | None = None
    """Recipe name (for messages and logs); None for a hand-made config."""
    bf16: bool = False
    """Train in bf16 (model.bf16, optimizer.bf16); master weights stay fp32 in the optimizer."""
    fp16: bool = False
    """Train in fp16 with loss scaling (model.fp16, optimizer.fp16)."""
    params_dtype: torch.dtype = torch.float32
    """dtype the weights are created in (model.params_dtype, optimizer.params_dtype)."""
    pipeline_dtype: torch.dtype | None = None
    """dtype of activations sent between pipeline stages; None: params_dtype."""
    autocast_enabled: bool = False
    """Run the forward step under torch.autocast (model.enable_autocast)."""
    autocast_dtype: torch.dtype | None = None
    """torch.autocast dtype; None: pipeline_dtype."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and all-reduce gradients in fp32 (ddp.grad_reduce_in_fp32)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 format through Transformer Engine: e4m3 everywhere, or hybrid (e5m2 for gradients); None: no FP8."""
    fp8_recipe: Literal["tensorwise", "delayed", "mxfp8", "blockwise"] = "tensorwise"
    """FP8 scaling: per-tensor current, delayed (amax history), MXFP8 blocks (Blackwell), 128-blocks (Hopper)."""
    fp8_margin: int = 0
    """Margin (power of 2) for the FP8 scaling factor."""
    fp8_amax_history_len: int = 1
    """amax history window of delayed scaling."""
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    """How delayed scaling picks amax from its history."""
    fp8_wgrad: bool = True
    """Compute weight gradients in FP8 (False: in higher precision)."""
    fp8_dot_product_attention: bool = False
    """Use TE's FP8 dot-product attention."""
    fp8_multi_head_attention: bool = False
    """Use TE's FP8 multi-head attention."""
    fp8_param_gather: bool = False
    """Keep weights in FP8 and all-gather them in FP8 (model.fp8_param and ddp.fp8_param_gather, kept equal)."""
    reuse_grad_buf_for_mxfp8_param_ag: bool = False
    """Reuse the gradient buffer for the MXFP8 parameter all-gather (saves memory; ddp and optimizer)."""
    first_last_layers_bf16: bool = False
    """Keep the first and last transformer layers in bf16 while the rest runs in FP8/FP4."""
    num_layers_at_start_in_bf16: int = 1
    """Layers at the start kept in bf16 when first_last_layers_bf16."""
    num_layers_at_end_in_bf16: int = 1
    """Layers at the end kept in bf16 when first_last_layers_bf16."""
    fp4: Literal["e2m1"] | None = None
    """FP4 format through Transformer Engine (NVFP4, Blackwell); None: no FP4."""
    fp4_recipe: Literal["nvfp4"] = "nvfp4"
    """FP4 scaling recipe."""
    fp4_param_gather: bool = False
    """Keep weights in FP4 and all-gather them in FP4 (model.fp4_param and ddp.fp4_param_gather, kept equal)."""
    loss_scale: float | None = None
    """Static loss scale for fp16; None: dynamic loss scaling."""
    initial_loss_scale: float = 2.0**32
    """First dynamic loss scale."""
    min_loss_scale: float = 1.0
    """Floor of the dynamic loss scale."""
    loss_scale_window: float = 1000
    """Iterations without overflow before the dynamic loss scale grows."""
    hysteresis: int = 2
    """Overflows tolerated before the dynamic loss scale shrinks."""

    @property
    def label(self) -> str:
        """How messages refer to this config: ``mixed_precision 'bf16_mixed'``."""
        return f"mixed_precision {self.name!r}" if self.name else "mixed_precision"

    def check(self, prefix: str = "mixed_precision") -> list[str]:
        """Problems with the recipe itself (hardware support is :func:`quantization_support_problems`)."""
        problems = type_problems(self, prefix)
        if problems:
            return problems
        if self.bf16 and self.fp16:
            problems.append(f"{prefix}.bf16 and {prefix}.fp16 are both true; pick one")
        expected = torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32
        if self.params_dtype != expected:
            problems.append(f"{prefix}.params_dtype is {_name(self.params_dtype)} but bf16={self.bf16}, "
                            f"fp16={self.fp16} need {_name(expected)}; set {prefix}.params_dtype={_name(expected)}")
        if self.fp8 and self.fp4:
            problems.append(f"{prefix}.fp8 ({self.fp8!r}) and {prefix}.fp4 ({self.fp4!r}) are both set; FP8 and "
                            "FP4 cannot be combined, set one to null")
        if (self.fp8 or self.fp4) and not (self.bf16 or self.fp16):
            problems.append(f"{prefix}: FP8/FP4 run on top of bf16 or fp16; set {prefix}.bf16=true "
                            f"(and params_dtype=bfloat16) or start from the bf16_mixed recipe")
        if self.fp8_param_gather and not self.fp8:
            problems.append(f"{prefix}.fp8_param_gather needs {prefix}.fp8; set it to false or choose an FP8 format")
        if self.fp4_param_gather and not self.fp4:
            problems.append(f"{prefix}.fp4_param_gather needs {prefix}.fp4; set it to false or set fp4=e2m1")
        if self.fp8 and self.fp8_recipe == "mxfp8" and self.fp8_param_gather \
                and not self.reuse_grad_buf_for_mxfp8_param_ag:
            problems.append(f"{prefix}: fp8_recipe=mxfp8 with fp8_param_gather needs "
                            f"{prefix}.reuse_grad_buf_for_mxfp8_param_ag=true")
        if self.fp8 and self.fp8_recipe == "delayed" and self.first_last_layers_bf16:
            problems.append(f"{prefix}: delayed FP8 scaling cannot keep first/last layers in bf16; set "
                            f"{prefix}.first_last_layers_bf16=false or use fp8_recipe=tensorwise")
        return problems + at_least(self, prefix, num_layers_at_start_in_bf16=0, num_layers_at_end_in_bf16=0,
                                   fp8_margin=0, fp8_amax_history_len=1)

    def apply(self, model_config: Any, optimizer_config: Any = None, ddp_config: Any = None) -> None:
        """Copy the precision fields onto megatron-core's configs, in place.

        Args:
            model_config: A TransformerConfig (the GPTModelProvider).
            optimizer_config: A megatron-core OptimizerConfig, or None.
            ddp_config: A megatron-core DistributedDataParallelConfig, or None.
        """
        targets = self.targets()
        for section, config in (("model", model_config), ("optimizer", optimizer_config), ("ddp", ddp_config)):
            names = {f.name for f in dataclasses.fields(config)} if config is not None else set()
            for name, (value, _) in targets[section].items() if config is not None else ():
                if name not in names:
                    raise TypeError(f"{type(config).__name__} has no field {name!r}; {self.label} targets "
                                    "megatron-core 0.19")
                if getattr(config, name) != value:
                    logger.info("%s sets %s.%s: %r -> %r", self.label, section, name, getattr(config, name), value)
                    setattr(config, name, value)

    def targets(self) -> dict[str, dict[str, tuple[Any, str]]]:
        """What :meth:`apply` sets: ``{section: {field: (value, the field of this recipe it comes from)}}`` for the
        sections ``model``, ``optimizer`` and ``ddp``."""
        pipeline_dtype = self.pipeline_dtype or self.params_dtype
        model = self._pick("bf16", "fp16", "params_dtype", "fp8", "fp4") | {
            "pipeline_dtype": (pipeline_dtype, "pipeline_dtype"),
            "enable_autocast": (self.autocast_enabled, "autocast_enabled"),
            "autocast_dtype": (self.autocast_dtype or pipeline_dtype, "autocast_dtype"),
            "fp8_param": (self.fp8_param_gather, "fp8_param_gather"),
            "fp4_param": (self.fp4_param_gather, "fp4_param_gather")}
        # the FP8/FP4 details only matter (and are only copied) when FP8/FP4 is on
        model |= self._pick(*(_FP8_DETAILS if self.fp8 else ()), *(("fp4_recipe",) if self.fp4 else ()),
                            *(_BF16_EDGES if self.fp8 or self.fp4 else ()))
        optimizer = self._pick("bf16", "fp16", "params_dtype", "reuse_grad_buf_for_mxfp8_param_ag", "loss_scale",
                               "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")
        optimizer["fp8_recipe"] = (self.fp8_recipe if self.fp8 else None, "fp8_recipe")
        ddp = self._pick("grad_reduce_in_fp32", "fp8_param_gather", "fp4_param_gather",
                         "reuse_grad_buf_for_mxfp8_param_ag")
        return {"model": model, "optimizer": optimizer, "ddp": ddp}

    def _pick(self, *names: str) -> dict[str, tuple[Any, str]]:
        return {name: (getattr(self, name), name) for name in names}


_FP8_DETAILS = ("fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_wgrad",
                "fp8_dot_product_attention", "fp8_multi_head_attention")
_BF16_EDGES = ("first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")


# ------------------------------------------------------------------------------------ hardware support

# (format, recipe) -> (minimum compute capability, GPU generation, Transformer Engine feature)
_SUPPORT = {
    ("fp8", "delayed"): ((8, 9), "Ada/Hopper or newer", "DelayedScaling"),
    ("fp8", "tensorwise"): ((8, 9), "Ada/Hopper or newer", "Float8CurrentScaling"),
    ("fp8", "blockwise"): ((9, 0), "Hopper or newer", "Float8BlockScaling"),
    ("fp8", "mxfp8"): ((10, 0), "Blackwell", "MXFP8BlockScaling"),
    ("fp4", "nvfp4"): ((10, 0), "Blackwell", "NVFP4BlockScaling"),
}
_MIN_TE_FOR_FP4 = "2.7.0.dev0"


def gpu_capability() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device, or None without a usable GPU."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def quantization_support_problems(fp8: str | None, fp8_recipe: str | None, fp4: str | None, fp4_recipe: str | None,
                                  source: str) -> list[str]:
    """What this machine lacks to run the requested FP8/FP4 recipe (Transformer Engine, a GPU, its generation).

    Args:
        fp8, fp8_recipe, fp4, fp4_recipe: The model's quantization fields (after mixed precision was applied).
        source: How the message names the setting, e.g. ``"mixed_precision 'bf16_with_mxfp8_mixed'"``.

    Returns:
        One message per missing requirement (empty when FP8/FP4 is off or everything is present).
    """
    if fp8:
        kind, recipe = "fp8", fp8_recipe or "delayed"
    elif fp4:
        kind, recipe = "fp4", fp4_recipe or "nvfp4"
    else:
        return []
    capability, generation, feature = _SUPPORT.get((kind, recipe), ((8, 9), "Ada/Hopper or newer", recipe))
    what = f"{source} ({kind.upper()} {recipe!r}, Transformer Engine {feature})"
    fallback = "; on this machine use mixed_precision=bf16_mixed"
    problems = []
    te_ok, te_info = transformer_engine_status()
    if not te_ok:
        problems.append(f"{what} needs Transformer Engine, which does not import here ({te_info}); install "
                        f"bridge-train[te] on a GPU machine{fallback}")
    elif kind == "fp4":
        from packaging.version import InvalidVersion, Version

        try:
            too_old = Version(te_info) < Version(_MIN_TE_FOR_FP4)
        except InvalidVersion:
            too_old = False
        if too_old:
            problems.append(f"{what} needs Transformer Engine >= 2.7, found {te_info}; upgrade transformer-engine")
    found = gpu_capability()
    need = f"{capability[0]}.{capability[1]}"
    if found is None:
        problems.append(f"{what} needs a CUDA GPU with compute capability >= {need} ({generation}); no CUDA GPU is "
                        f"visible (torch.cuda.is_available() is False){fallback}")
    elif found < capability:
        problems.append(f"{what} needs compute capability >= {need} ({generation}); this GPU has "
                        f"{found[0]}.{found[1]}{fallback}")
    return problems


# --------------------------------------------------------------------------------------------- recipes

_BASES = {
    "bf16": dict(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, grad_reduce_in_fp32=True),
    "fp16": dict(fp16=True, params_dtype=torch.float16, pipeline_dtype=torch.float16, grad_reduce_in_fp32=False),
}
_FP8 = {  # on top of bf16 or fp16
    # amax history 1024 / max, FP8 parameter all-gather
    "fp8_delayed_scaling": dict(fp8="hybrid", fp8_recipe="delayed", fp8_margin=0, fp8_amax_history_len=1024,
                                fp8_amax_compute_algo="max", fp8_param_gather=True),
    # per-tensor current scaling, first and last layer kept in 16 bits
    "fp8_current_scaling": dict(fp8="hybrid", fp8_recipe="tensorwise", first_last_layers_bf16=True,
                                num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1, fp8_param_gather=True),
    # 128x128 weight / 1x128 activation blocks (Hopper), no FP8 parameter all-gather
    "fp8_subchannel_scaling": dict(fp8="hybrid", fp8_recipe="blockwise", fp8_param_gather=False),
    # MXFP8 blocks (Blackwell), parameter all-gather reusing the gradient buffer
    "mxfp8": dict(fp8="e4m3", fp8_recipe="mxfp8", fp8_param_gather=True, reuse_grad_buf_for_mxfp8_param_ag=True),
}
_RECIPES = {
    "fp32": dict(params_dtype=torch.float32, grad_reduce_in_fp32=False),
    "bf16_mixed": _BASES["bf16"],
    "fp16_mixed": _BASES["fp16"],  # dynamic loss scaling
    **{f"{base}_with_{kind}_mixed": {**_BASES[base], **fields} for kind, fields in _FP8.items() for base in _BASES},
    "bf16_with_nvfp4_mixed": {**_BASES["bf16"], "fp4": "e2m1", "fp4_recipe": "nvfp4", "fp4_param_gather": True},
}

MIXED_PRECISION_RECIPES: dict[str, Callable[[], MixedPrecisionConfig]] = {
    name: functools.partial(MixedPrecisionConfig, name=name, **fields) for name, fields in _RECIPES.items()
}
"""Every named recipe (Megatron-Bridge's names and values), by its underscore name; each call gives a fresh config.
Hyphen spellings are accepted by :func:`get_mixed_precision_config`."""


def get_mixed_precision_config(name: str | MixedPrecisionConfig) -> MixedPrecisionConfig:
    """A fresh :class:`MixedPrecisionConfig` for a recipe name (``bf16_mixed`` or ``bf16-mixed``), or ``name`` itself.

    Raises:
        ValueError: for an unknown name; the message lists the recipes and the closest one.
    """
    if isinstance(name, MixedPrecisionConfig):
        return name
    key = str(name).strip().replace("-", "_")
    if key in MIXED_PRECISION_RECIPES:
        return MIXED_PRECISION_RECIPES[key]()
    raise ValueError(unknown_name_message("mixed precision recipe", name, list(MIXED_PRECISION_RECIPES)))
