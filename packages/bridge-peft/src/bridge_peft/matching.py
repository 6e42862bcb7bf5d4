"""Which modules of a megatron-core model a PEFT method adapts.

Module names are *global* megatron-core names (``decoder.layers.{global layer}.self_attention.linear_qkv``), so
a pattern means the same layers whatever the pipeline layout. A pattern is one of:

- a plain name: ``linear_qkv`` matches every module whose name ends in ``.linear_qkv`` (or is exactly it);
  a dotted plain name (``decoder.layers.3.mlp.linear_fc2``) matches that module only;
- a wildcard (contains ``*``, ``?`` or ``[``): :func:`fnmatch.fnmatchcase` against the whole name, e.g.
  ``*.layers.0.*.linear_qkv`` (``*`` crosses dots);
- a regular expression, written ``re:<pattern>``: :func:`re.fullmatch` against the whole name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

__all__ = ["check_patterns", "linear_layer_names", "matches", "matching_patterns"]

_WILDCARD = set("*?[")


def check_patterns(patterns: Iterable[str], field: str) -> None:
    """Raise ValueError for a pattern that is not a non-empty string or an invalid regular expression."""
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"{field}: every entry must be a non-empty module name or pattern, got {pattern!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"{field}: {pattern!r} is not a valid regular expression ({exc})") from None


def _matches_one(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _WILDCARD & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def matching_patterns(name: str, patterns: Iterable[str]) -> list[str]:
    """The patterns of ``patterns`` that match the module ``name``."""
    return [p for p in patterns if _matches_one(name, p)]


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when any of ``patterns`` matches the module ``name``."""
    return any(_matches_one(name, p) for p in patterns)


def linear_layer_names(provider) -> list[str]:
    """Global names of the linear layers of the GPT model that ``provider`` (a bridge-convert model provider) builds,
    in every layer and pipeline stage, read from its family's mapping table: what target patterns match against,
    known without building the model."""
    from bridge_convert import AutoBridge

    table = AutoBridge.for_provider(provider).model_bridge.mappings_for(provider)
    modules = dict.fromkeys(m.megatron.removesuffix(".weight") for m in table if m.megatron.endswith(".weight"))
    linear = [m for m in modules if m.rpartition(".")[2].startswith("linear_") or m == "output_layer"]
    return [m.replace("*", str(layer)) if "*" in m else m
            for m in linear for layer in (range(provider.num_layers) if "*" in m else (None,))]
