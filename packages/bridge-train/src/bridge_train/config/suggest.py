"""Error text for an unknown key: the closest valid key, found with difflib."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest_key", "unknown_key_message"]


def closest_key(key: str, candidates: Iterable[str], everywhere: Iterable[str] = ()) -> str | None:
    """The valid key most like ``key``: first among its siblings, then any key anywhere with the same leaf name.

    Args:
        key: The dotted key that was not found (``train.trian_iters``).
        candidates: Valid dotted keys at the same level (``train.train_iters``, ...).
        everywhere: Every valid dotted key, for keys put under the wrong section (``train.lr`` -> ``optimizer.lr``).
    """
    candidates = list(candidates)
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    if match:
        return match[0]
    leaf = key.rsplit(".", 1)[-1]
    leaves = {}
    for full in everywhere:
        leaves.setdefault(full.rsplit(".", 1)[-1], full)
    exact = leaves.get(leaf)
    if exact:
        return exact
    close_leaf = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)
    if close_leaf:
        return leaves[close_leaf[0]]
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_message(key: str, candidates: Iterable[str], everywhere: Iterable[str] = ()) -> str:
    """``"unknown key 'train.trian_iters'; did you mean 'train.train_iters'?"``."""
    best = closest_key(key, candidates, everywhere)
    hint = f"; did you mean {best!r}?" if best else "; it is not a field of this config"
    return f"unknown key {key!r}{hint}"
