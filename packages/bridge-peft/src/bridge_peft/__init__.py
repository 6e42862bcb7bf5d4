"""bridge-peft: LoRA, DoRA, canonical LoRA and user-defined PEFT for megatron-core models.

```python
from bridge_peft import LoRA, save_hf_adapter
model = LoRA(dim=8, alpha=16)(model, training=True)   # adapters on a list of model chunks, base frozen
save_hf_adapter(bridge, model, "/out/adapter")        # HF PEFT format
```
"""

from .adapters import LoRAAdapter
from .base import PEFT
from .hf_adapter import save_hf_adapter
from .hf_import import load_hf_adapter
from .linear import AdapterModule, LinearInfo, linear_info
from .lora import CanonicalLoRA, DoRA, LoRA
from .merge import adapters_disabled, merge_adapters, unmerge_adapters

__all__ = [
    "PEFT",
    "AdapterModule",
    "CanonicalLoRA",
    "DoRA",
    "LinearInfo",
    "LoRA",
    "LoRAAdapter",
    "adapters_disabled",
    "linear_info",
    "load_hf_adapter",
    "merge_adapters",
    "save_hf_adapter",
    "unmerge_adapters",
]
