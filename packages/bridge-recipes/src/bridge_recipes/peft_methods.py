"""The PEFT methods the recipes use, by name: ``lora`` and ``dora`` (bridge-peft's ``LoRA`` / ``DoRA``).

bridge-peft is imported only when a PEFT recipe is built, so pretraining and SFT recipes work without it.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["PEFT_METHODS", "peft_class", "peft_method", "register_with_bridge_train"]

PEFT_METHODS = {"lora": "LoRA", "dora": "DoRA", "canonical_lora": "CanonicalLoRA"}
"""Scheme name -> class name in ``bridge_peft``."""


def peft_class(name: str) -> type:
    """bridge-peft's class for scheme ``name``.

    Raises:
        ValueError: for an unknown scheme.
        ImportError: when bridge-peft is not installed.
    """
    key = str(name).strip().lower()
    if key not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT scheme {name!r}; choose one of {', '.join(PEFT_METHODS)}")
    try:
        import bridge_peft
    except ImportError as err:
        raise ImportError(f"PEFT recipes need bridge-peft, which is not importable ({err}); install bridge-peft") \
            from None
    cls = getattr(bridge_peft, PEFT_METHODS[key], None)
    if cls is None:
        raise ImportError(f"the installed bridge-peft has no {PEFT_METHODS[key]}; install a bridge-peft that "
                          "provides LoRA and DoRA")
    return cls


def peft_method(name: str, *, dim: int, alpha: int, target_modules: list[str]) -> Any:
    """A bridge-peft ``LoRA`` / ``DoRA`` / ``CanonicalLoRA`` with these adapter settings (other fields at bridge-peft's
    defaults). For ``canonical_lora`` a fused layer named in ``target_modules`` stands for its projections
    (``linear_qkv`` -> ``linear_q``, ``linear_k``, ``linear_v``; ``linear_fc1`` -> ``linear_fc1_gate``,
    ``linear_fc1_up``), so the recipes' targets adapt the same layers."""
    cls = peft_class(name)
    targets = list(target_modules)
    if cls.__name__ == "CanonicalLoRA":
        from bridge_peft.lora import CANONICAL_TARGETS

        parts: dict[str, list[str]] = {}
        for canonical, (fused, _) in CANONICAL_TARGETS.items():
            parts.setdefault(fused, []).append(canonical)
        targets = [c for t in targets for c in ([t] if _is_pattern(t) else _split(t, parts))]
    return cls(target_modules=targets, dim=dim, alpha=alpha)


def _is_pattern(target: str) -> bool:
    return target.startswith("re:") or any(c in target for c in "*?[")


def _split(target: str, parts: dict[str, list[str]]) -> list[str]:
    """``linear_qkv`` / ``decoder.layers.3.self_attention.linear_qkv`` as its canonical projections' names."""
    prefix, _, leaf = target.rpartition(".")
    return [f"{prefix}.{c}" if prefix else c for c in parts[leaf]] if leaf in parts else [target]


def register_with_bridge_train() -> None:
    """Make ``peft=lora`` / ``peft=dora`` / ``peft=canonical_lora`` resolve in bridge-train's overrides and YAML
    (bridge-peft's defaults; the recipes' own adapter settings come from :func:`peft_method`). Idempotent;
    bridge-peft is imported only when such an override is applied."""
    from bridge_train.config import register_peft_method

    for name, factory in _FACTORIES.items():
        register_peft_method(name, factory)


def _default_method(name: str) -> Any:
    return peft_class(name)()


_FACTORIES = {name: functools.partial(_default_method, name) for name in PEFT_METHODS}
"""One factory per name: registering them again (another recipe built) is then a no-op."""
