"""How the config system reports trouble: one error listing every problem, a warning class, and did-you-mean text.

Spelling (difflib) catches typos (``trian_iters``), but a name from another framework is a different word, not a
typo: ``learning_rate`` is closest by spelling to ``main_grads_dtype``. So after near-spellings and the same name
in another section (``train.lr`` -> ``optimizer.lr``), keys are ranked by the words they share
(``scheduler.max_lr`` -> ``optimizer.lr``) and by abbreviation (``learning_rate`` <-> ``lr``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = ["ConfigError", "ConfigWarning", "closest_key", "unknown_key_message", "unknown_name_message"]


class ConfigError(ValueError):
    """Every problem found in a config (or a set of overrides), raised together.

    Each entry of :attr:`problems` names the dotted field (``train.global_batch_size``), the value and the fix.
    """

    def __init__(self, problems: Sequence[str], header: str = "invalid config") -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(f"{header} ({count} problem{'s' if count != 1 else ''}):\n  - {lines}")


class ConfigWarning(UserWarning):
    """A setting was ignored or could not be saved; the message names it."""


def unknown_name_message(what: str, name: str, known: Sequence[str]) -> str:
    """``"unknown PEFT method 'lorra'; did you mean 'lora'? Known: dora, lora"`` or ``"unknown ... 'x'. Known: ..."``
    (a registry lookup); a name that starts one or more known ones (``bf16``) suggests the shortest of them."""
    key = str(name).strip().lower().replace("-", "_")
    close = difflib.get_close_matches(key, list(known), n=1) or sorted(
        (k for k in known if key and k.startswith(key)), key=len)[:1]
    return f"unknown {what} {name!r}{f'; did you mean {close[0]!r}?' if close else '.'} Known: {', '.join(known)}"


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _word_score(typed: str, name: str) -> float:
    """1 when one name abbreviates the other (``learning_rate`` / ``lr``), else the share of common words."""
    typed_words, name_words = typed.lower().split("_"), name.lower().split("_")
    if "".join(w[:1] for w in typed_words) == name or "".join(w[:1] for w in name_words) == typed.lower():
        return 1.0
    return len(set(typed_words) & set(name_words)) / len(set(typed_words) | set(name_words))


_ALIASES = {
    "iters": "train.train_iters", "max_steps": "train.train_iters", "train_steps": "train.train_iters",
    "tp": "model.tensor_model_parallel_size", "pp": "model.pipeline_model_parallel_size",
    "cp": "model.context_parallel_size", "ep": "model.expert_model_parallel_size",
    "vp": "model.virtual_pipeline_model_parallel_size", "vpp": "model.virtual_pipeline_model_parallel_size",
    "num_heads": "model.num_attention_heads", "n_heads": "model.num_attention_heads",
    "num_kv_heads": "model.num_query_groups", "num_key_value_heads": "model.num_query_groups",
    "save_dir": "checkpoint.save", "load_dir": "checkpoint.load", "seed": "rng.seed",
    "log_every": "logger.log_interval", "log_freq": "logger.log_interval", "beta1": "optimizer.adam_beta1",
    "beta2": "optimizer.adam_beta2", "eps": "optimizer.adam_eps", "warmup_steps": "scheduler.lr_warmup_iters",
}
"""Names other trainers (Hugging Face, torchtitan, Megatron-LM's flags) use for a key of another name or section."""


def closest_key(key: str, candidates: Iterable[str], everywhere: Iterable[str] = ()) -> str | None:
    """The valid key most like ``key``, or None when nothing is close.

    Args:
        key: The dotted key that was not found (``train.trian_iters``).
        candidates: Valid dotted keys at the same level (``train.train_iters``, ...).
        everywhere: Every valid dotted key, for keys put under the wrong section (``train.lr`` -> ``optimizer.lr``).
    """
    leaf = _leaf(key)
    siblings = {_leaf(k): k for k in candidates}
    others: dict[str, str] = {}
    everywhere = list(everywhere)
    for full in everywhere:
        others.setdefault(_leaf(full), full)
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.8)
    alias = _ALIASES.get(leaf.lower())
    alias = alias if alias in everywhere else None
    if match or alias or leaf in others:
        return siblings[match[0]] if match else alias or others[leaf]
    # (score, spelling similarity, key): a sibling wins a tie, as the user chose its section
    ranked = [(_word_score(leaf, name) + (0.1 if full in siblings.values() else 0),
               difflib.SequenceMatcher(None, leaf, name).ratio(), full)
              for name, full in {**others, **siblings}.items()]
    best = max(ranked, default=None)
    if best is not None and best[0] >= 0.4:
        return best[2]
    for pool, cutoff in ((others, 0.8), (siblings, 0.6)):
        match = difflib.get_close_matches(leaf, list(pool), n=1, cutoff=cutoff)
        if match:
            return pool[match[0]]
    return None


def unknown_key_message(key: str, candidates: Iterable[str], everywhere: Iterable[str] = ()) -> str:
    """``"unknown key 'train.trian_iters'; did you mean 'train.train_iters'?"``."""
    best = closest_key(key, candidates, everywhere)
    return f"unknown key {key!r}" + (f"; did you mean {best!r}?" if best else "; it is not a field of this config")
