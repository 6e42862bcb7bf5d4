"""Recipes for ``llama32_1b`` (see :mod:`bridge_recipes.llama._spec` for its layouts and batch sizes)."""

from ._builders import recipe_functions
from ._spec import SPECS

SPEC = SPECS["llama32_1b"]
pretrain_config, sft_config, peft_config = recipe_functions(SPEC, __name__)

__all__ = ["SPEC", "peft_config", "pretrain_config", "sft_config"]
