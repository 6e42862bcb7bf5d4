"""bridge-convert: HF <-> Megatron checkpoint conversion on megatron-core.

```python
from bridge_convert import AutoBridge
bridge = AutoBridge.from_hf_pretrained("/models/Llama-3.2-1B")
model = bridge.to_megatron_model(load_weights=True, wrap_with_ddp=False)
bridge.save_hf_pretrained(model, "/out/llama-hf")
```
"""

from .auto_bridge import AutoBridge
from .mappings import QKV, Direct, GatedMLP, Mapping, VocabParallel
from .model_bridge import ModelBridge
from .provider import GPTModelProvider
from .registry import get_bridge, supported_architectures
from .runtime import ParallelLayout, initialize_parallel

__all__ = [
    "QKV",
    "AutoBridge",
    "Direct",
    "GPTModelProvider",
    "GatedMLP",
    "Mapping",
    "ModelBridge",
    "ParallelLayout",
    "VocabParallel",
    "get_bridge",
    "initialize_parallel",
    "supported_architectures",
]
