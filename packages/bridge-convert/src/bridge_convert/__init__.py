"""bridge-convert: HF <-> Megatron checkpoint conversion on megatron-core.

```python
from bridge_convert import AutoBridge
bridge = AutoBridge.from_hf_pretrained("/models/Llama-3.2-1B")
model = bridge.to_megatron_model(load_weights=True, wrap_with_ddp=False)
bridge.save_hf_pretrained(model, "/out/llama-hf")
```
Names are imported lazily: ``import bridge_convert`` does not import megatron-core until one is used.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "AutoBridge": ".auto_bridge",
    "CheckpointMismatchError": ".errors",
    "GPTModelProvider": ".provider",
    "ModelBridge": ".model_bridge",
    "Mapping": ".mappings",
    "Direct": ".mappings",
    "QKV": ".mappings",
    "GatedMLP": ".mappings",
    "VocabParallel": ".mappings",
    "get_bridge": ".registry",
    "supported_architectures": ".registry",
    "ParallelLayout": ".runtime",
    "initialize_parallel": ".runtime",
}

__all__ = [
    "QKV",
    "AutoBridge",
    "CheckpointMismatchError",
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


def __getattr__(name: str):
    if name in _EXPORTS:
        # The public entry points (AutoBridge & co.) hide megatron-core's known-harmless warnings before it is
        # imported; BRIDGE_SHOW_WARNINGS=1 shows them (runtime/warnings_filter.py).
        from .runtime.warnings_filter import silence_known_warnings

        silence_known_warnings()
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bridge_convert' has no attribute {name!r}")


if TYPE_CHECKING:
    from .auto_bridge import AutoBridge
    from .errors import CheckpointMismatchError
    from .mappings import QKV, Direct, GatedMLP, Mapping, VocabParallel
    from .model_bridge import ModelBridge
    from .provider import GPTModelProvider
    from .registry import get_bridge, supported_architectures
    from .runtime import ParallelLayout, initialize_parallel
