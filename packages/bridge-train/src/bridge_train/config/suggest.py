"""Error text for an unknown key: the valid key the user most likely meant.

Spelling (difflib) catches typos (``trian_iters``), but a name from another framework is a different word, not a
typo: ``learning_rate`` is closest by spelling to ``main_grads_dtype``. So after near-spellings and the same name
in another section (``train.lr`` -> ``optimizer.lr``), keys are ranked by the words they share
(``scheduler.max_lr`` -> ``optimizer.lr``) and by abbreviation (``learning_rate`` <-> ``lr``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest_key", "unknown_key_message"]


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _word_score(typed: str, name: str) -> float:
    """1 when one name abbreviates the other (``learning_rate`` / ``lr``), else the share of common words."""
    typed_words, name_words = typed.lower().split("_"), name.lower().split("_")
    if "".join(w[:1] for w in typed_words) == name or "".join(w[:1] for w in name_words) == typed.lower():
        return 1.0
    common = set(typed_words) & set(name_words)
    return len(common) / len(set(typed_words) | set(name_words))


def closest_key(key: str, candidates: Iterable[str], everywhere: Iterable[str] = ()) -> str | None:
    """The valid key most like ``key``, or None when nothing is close.

    Args:
        key: The dotted key that was not found (``train.trian_iters``).
        candidates: Valid dotted keys at the same level (``train.train_iters``, ...).
        everywhere: Every valid dotted key, for keys put under the wrong section (``train.lr`` -> ``optimizer.lr``).
    """
    leaf = _leaf(key)
    siblings = {_leaf(k): k for k in candidates}
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.8)
    if match:
        return siblings[match[0]]
    others: dict[str, str] = {}
    for full in everywhere:
        others.setdefault(_leaf(full), full)
    if leaf in others:
        return others[leaf]
    # (score, spelling similarity, key): a sibling wins a tie, as the user chose its section
    ranked = [(_word_score(leaf, name) + 0.1, difflib.SequenceMatcher(None, leaf, name).ratio(), full)
              for name, full in siblings.items()]
    ranked += [(_word_score(leaf, name), difflib.SequenceMatcher(None, leaf, name).ratio(), full)
               for name, full in others.items() if full not in siblings.values()]
    best = max(ranked, default=None)
    if best is not None and best[0] >= 0.4:
        return best[2]
    match = difflib.get_close_matches(leaf, list(others), n=1, cutoff=0.8)
    if match:
        return others[match[0]]
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    return siblings[match[0]] if match else None


def unknown_key_message(key: str, candidates: Iterable[str], everywhere: Iterable[str] = ()) -> str:
    """``"unknown key 'train.trian_iters'; did you mean 'train.train_iters'?"``."""
    best = closest_key(key, candidates, everywhere)
    hint = f"; did you mean {best!r}?" if best else "; it is not a field of this config"
    return f"unknown key {key!r}{hint}"
