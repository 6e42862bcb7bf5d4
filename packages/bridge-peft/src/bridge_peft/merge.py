"""Merge adapters into the base weights, undo it, or switch adapters off for a while.

HF peft has ``merge_and_unload`` / ``unmerge``; here both work in place on megatron-core models at any TP layout:
each rank folds its own shard (``s B A`` is computed from the adapter shards it holds; a rank-split A is
gathered first; the DoRA row norm is summed over TP where the input dim is split). A merged model's adapters
stay attached but inactive, so :func:`unmerge_adapters` restores the base and re-activates them, and
``bridge.save_hf_pretrained`` exports the merged weights (adapter tensors are not exported).
"""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["adapters_disabled", "merge_adapters", "unmerge_adapters"]


def _adapters(model):
    from .base import adapters_of

    pairs = adapters_of(model)
    if not pairs:
        raise ValueError("the model has no adapters: apply a PEFT method (e.g. LoRA()(model)) or load_hf_adapter "
                         "first")
    return pairs


def merge_adapters(model) -> None:
    """Fold every adapter into its layer's weight (``W + s B A``; DoRA: ``m / ||W + s B A|| (W + s B A)``).

    Every rank of the model calls this. Adapters that are already merged are left as they are.

    Raises:
        ValueError: if the model has no adapters; TypeError for an adapter that cannot be merged.
    """
    for linear, adapter in _adapters(model):
        if not hasattr(adapter, "merge"):
            raise TypeError(f"{type(adapter).__name__} has no merge(); a user-defined adapter must implement "
                            "merge(weight) / unmerge(weight) to be merged")
        adapter.merge(linear.weight)


def unmerge_adapters(model) -> None:
    """Undo :func:`merge_adapters`: restore the base weights and re-activate the adapters."""
    for linear, adapter in _adapters(model):
        if hasattr(adapter, "unmerge"):
            adapter.unmerge(linear.weight)


@contextmanager
def adapters_disabled(model):
    """Run the base model alone: adapters switched off; merged ones are unmerged for the while (as HF peft's
    ``disable_adapter`` does) and merged again on exit, so the weights come back to within rounding of the
    weight dtype. Restores the previous state on exit.

    Raises:
        ValueError: if the model has no adapters; TypeError for a merged adapter that cannot be unmerged.
    """
    pairs = _adapters(model)
    merged = [(linear, adapter) for linear, adapter in pairs if getattr(adapter, "merged", False)]
    for _, adapter in merged:
        if not hasattr(adapter, "unmerge"):
            raise TypeError(f"{type(adapter).__name__} is merged and has no unmerge(): its layer cannot run the "
                            "base weights alone")
    previous = [adapter.enabled for _, adapter in pairs]
    for linear, adapter in merged:
        adapter.unmerge(linear.weight)
    for _, adapter in pairs:
        adapter.enabled = False
    try:
        yield model
    finally:
        for (_, adapter), state in zip(pairs, previous):
            adapter.enabled = state
        for linear, adapter in merged:
            adapter.merge(linear.weight)
