"""bridge-recipes: the Llama 3 / 3.1 / 3.2 recipes and ``bridge-run``.

Importing it registers its PEFT methods (``lora``, ``dora``, ``canonical_lora``) with bridge-train, so that
``peft=lora`` resolves in overrides and YAML (bridge-peft is imported only when one is applied).
"""

from .peft_methods import register_with_bridge_train

register_with_bridge_train()
