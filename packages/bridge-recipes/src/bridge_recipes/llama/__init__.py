"""Llama 3 (8B, 70B), 3.1 (8B, 70B, 405B) and 3.2 (1B, 3B) recipes.

```python
from bridge_recipes.llama import llama32_1b
cfg = llama32_1b.pretrain_config()           # also sft_config(), peft_config(peft="lora" | "dora")
```
Each model module holds ``pretrain_config``, ``sft_config``, ``peft_config`` and ``SPEC`` (its layouts and
batch sizes). The shipped HF config.json of every model is :func:`hf_config`.
"""

from . import llama3_8b, llama3_70b, llama31_8b, llama31_70b, llama31_405b, llama32_1b, llama32_3b
from ._spec import SPECS, LlamaSpec, Parallelism, hf_config

MODELS = {module.SPEC.name: module for module in (llama32_1b, llama32_3b, llama3_8b, llama3_70b, llama31_8b,
                                                   llama31_70b, llama31_405b)}
"""Recipe prefix -> model module."""

__all__ = ["MODELS", "SPECS", "LlamaSpec", "Parallelism", "hf_config", "llama3_8b", "llama3_70b", "llama31_8b",
           "llama31_70b", "llama31_405b", "llama32_1b", "llama32_3b"]
