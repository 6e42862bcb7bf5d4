"""Data-parallel batch sampling that resumes exactly where training stopped.

The epochs' orders, one after the other, make one stream of samples; it is consumed in global steps of
``G = micro_batch_size * dp_size``: step ``k`` takes positions ``[k * G, (k + 1) * G)`` of the stream (cycling, a
step can take the end of one epoch and the start of the next), and DP rank ``r`` reads the ``r``-th slice of
``micro_batch_size`` of them. The only state is ``consumed_samples``, counted over all DP ranks, and a position of
the stream does not depend on ``G``, so a run resumed from a saved state (even with another DP size) draws exactly
the samples an uninterrupted run would have drawn next. Without cycling, a trailing partial global step is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from bridge_data.samples import collate_samples


class DistributedBatchSampler:
    """Batch sampler of one DP rank, with ``state_dict()``/``load_state_dict()`` for exact resume.

    Args:
        dataset_len: Number of samples in the dataset.
        micro_batch_size: Samples per batch on this rank.
        dp_rank: This rank's index in the data-parallel group.
        dp_size: Size of the data-parallel group.
        consumed_samples: Samples already consumed by all DP ranks together (where to start).
        shuffle: Draw each epoch in a fresh random order (seeded by ``(seed, epoch)``); else in index order.
        seed: Seed of the shuffled orders.
        cycle: Continue into later epochs forever; else stop at the end of the first epoch.

    Raises:
        ValueError: On a rank outside ``[0, dp_size)``, non-positive sizes, or a dataset smaller than one
            global step.
    """

    def __init__(self, dataset_len: int, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, shuffle: bool = False, seed: int = 0, cycle: bool = False) -> None:
        problems = []
        if micro_batch_size < 1:
            problems.append(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            problems.append(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            problems.append(f"consumed_samples must be >= 0, got {consumed_samples}")
        if not problems and dataset_len < micro_batch_size * dp_size:
            problems.append(f"the dataset has {dataset_len} samples, fewer than one global step of "
                            f"micro_batch_size * dp_size = {micro_batch_size * dp_size}")
        if problems:
            raise ValueError("DistributedBatchSampler: " + "; ".join(problems))
        self.dataset_len = dataset_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        """Samples handed out so far, over all DP ranks (advanced as batches are yielded)."""
        self.shuffle = shuffle
        self.seed = seed
        self.cycle = cycle

    @property
    def global_batch_size(self) -> int:
        """Samples consumed per step over all DP ranks."""
        return self.micro_batch_size * self.dp_size

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_len)
        return np.random.default_rng((self.seed, epoch)).permutation(self.dataset_len)

    def __iter__(self) -> Iterator[list[int]]:
        orders: dict[int, np.ndarray] = {}
        n = self.dataset_len
        while self.cycle or self.consumed_samples + self.global_batch_size <= n:
            start = self.consumed_samples + self.dp_rank * self.micro_batch_size
            batch = []
            for pos in range(start, start + self.micro_batch_size):
                epoch = pos // n
                if epoch not in orders:
                    orders = {e: o for e, o in orders.items() if e >= epoch - 1}  # a step spans two epochs at most
                    orders[epoch] = self._order(epoch)
                batch.append(int(orders[epoch][pos % n]))
            self.consumed_samples += self.global_batch_size
            yield batch

    def __len__(self) -> int:
        """Batches left to yield on this rank (one epoch at most; undefined when cycling)."""
        if self.cycle:
            raise TypeError("a cycling DistributedBatchSampler has no length")
        return max(0, self.dataset_len - self.consumed_samples) // self.global_batch_size

    def state_dict(self) -> dict[str, Any]:
        """The resume state: consumed samples plus what must match on resume."""
        return {"consumed_samples": self.consumed_samples, "dataset_len": self.dataset_len,
                "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, possibly of another DP rank or size).

        Raises:
            ValueError: If the dataset length, shuffle or seed differ, which would change the sample order.
        """
        mismatched = [f"{k}: saved {state[k]!r}, now {getattr(self, k)!r}"
                      for k in ("dataset_len", "shuffle", "seed") if state[k] != getattr(self, k)]
        if mismatched:
            raise ValueError("Cannot resume the sampler exactly, the sample order changed: " + "; ".join(mismatched))
        self.consumed_samples = int(state["consumed_samples"])


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A DataLoader over a :class:`DistributedBatchSampler` whose state counts delivered batches only.

    Worker processes prefetch batches, which advances the sampler past what the training loop has seen;
    :meth:`state_dict` reports the samples of the batches actually returned, and a new ``iter()`` rewinds the
    sampler to that point.
    """

    batch_sampler: DistributedBatchSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._delivered: int | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.batch_sampler
        if self._delivered is not None:
            sampler.consumed_samples = self._delivered
        self._delivered = sampler.consumed_samples
        for batch in super().__iter__():
            self._delivered += sampler.global_batch_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler state as of the last batch returned."""
        state = self.batch_sampler.state_dict()
        if self._delivered is not None:
            state["consumed_samples"] = self._delivered
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (see :meth:`DistributedBatchSampler.load_state_dict`)."""
        self.batch_sampler.load_state_dict(state)
        self._delivered = self.batch_sampler.consumed_samples


def build_dataloader(dataset: torch.utils.data.Dataset, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                     consumed_samples: int = 0, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                     collate_fn: Callable[[list], Any] | None = None, cycle: bool = False,
                     pin_memory: bool = False) -> ResumableDataLoader:
    """A DataLoader yielding this DP rank's micro-batches, resumable through ``state_dict()``.

    Args:
        dataset: Any map-style dataset with ``__len__`` (e.g. from ``PretrainDataConfig.build``).
        micro_batch_size: Samples per batch on this rank.
        dp_rank: This rank's index in the data-parallel group.
        dp_size: Size of the data-parallel group.
        consumed_samples: Samples already consumed by all DP ranks (e.g. restored from a checkpoint).
        shuffle: Shuffle every epoch (pretraining datasets are shuffled by megatron-core already).
        seed: Seed of the shuffle.
        num_workers: DataLoader worker processes.
        collate_fn: Batch collation; None uses :func:`bridge_data.collate_samples`.
        cycle: Loop over epochs forever instead of stopping after one.
        pin_memory: Pin batches for faster host-to-GPU copies.

    Returns:
        A :class:`ResumableDataLoader`.
    """
    sampler = DistributedBatchSampler(len(dataset), micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                                      dp_size=dp_size, consumed_samples=consumed_samples, shuffle=shuffle,
                                      seed=seed, cycle=cycle)
    # A generator of its own: torch's DataLoader draws its workers' base seed each time an iterator is built, from
    # the global RNG otherwise, which moved the model's dropout masks by one draw after a resume (the iterator is
    # built after the RNG state is restored there, before the first iteration otherwise).
    return ResumableDataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                               collate_fn=collate_fn or collate_samples, pin_memory=pin_memory,
                               generator=torch.Generator().manual_seed(seed))
