"""Mock pretraining data: deterministic random token documents, sampled by megatron-core's GPTDataset machinery.

megatron-core's own ``MockGPTDataset`` writes ``1, 2, 3, ...`` into every document; here each document is a random
walk over the vocabulary (never the eod or pad id) followed by eod: a uniform random first id, then each id is the previous
one plus a random step of 1, 2 or 3 (wrapping around). Every id is equally frequent, yet there is something to
learn: a model's next-token loss can fall from ln(vocab) towards ln(3), which makes mock-data runs show real
progress. Documents come from a generator seeded by ``(seed, document)``, so the same seed always gives the same
samples and no file is read or written.
"""

from __future__ import annotations

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset, MockGPTLowLevelDataset


class RandomDocuments(MockGPTLowLevelDataset):
    """A fixed set of random-walk documents of random lengths in ``[1, 2 * seq_length]``.

    Args:
        vocab_size: Ids are drawn from ``[0, vocab_size)`` minus ``eod`` and ``pad``.
        eod: Id ending every document.
        pad: The padding id (megatron-core masks and zeroes it in samples), or None / a negative id: none.
        seed: Seed of the document lengths and contents.
        seq_length: Sample length; documents are up to twice as long, so samples cross document boundaries.
        num_documents: How many distinct documents exist (megatron-core repeats them in epochs as needed).
    """

    def __init__(self, *, vocab_size: int, eod: int, seed: int, seq_length: int,
                 num_documents: int = 100_000, pad: int | None = None) -> None:
        self.vocab_size = int(vocab_size)
        self.eod_token = int(eod)
        has_pad = pad is not None and 0 <= pad < self.vocab_size
        self._skipped = sorted({self.eod_token, int(pad)} if has_pad else {self.eod_token})
        self.seed = int(seed)
        self.size = int(num_documents)
        self.max_sequence_length = 2 * int(seq_length)
        rng = np.random.default_rng(self.seed)
        self.sequence_lengths = rng.integers(1, self.max_sequence_length + 1, size=self.size, dtype=np.int32)

    def __getitem__(self, idx: int) -> np.ndarray:
        length = int(self.sequence_lengths[idx])
        rng = np.random.default_rng((self.seed, int(idx)))
        ids = self.vocab_size - len(self._skipped)  # every id but eod and pad
        walk = rng.integers(0, ids) + np.cumsum(rng.integers(1, 4, size=length - 1, dtype=np.int64)) - 1
        body = walk % ids
        for skipped in self._skipped:  # ascending: each shift moves ids past one skipped id
            body[body >= skipped] += 1
        return np.concatenate([body, np.array([self.eod_token], dtype=np.int64)])


class RandomMockGPTDataset(MockGPTDataset):
    """megatron-core's ``MockGPTDataset`` over :class:`RandomDocuments` instead of counting sequences."""

    @staticmethod
    def build_low_level_dataset(dataset_path: str | None, config: GPTDatasetConfig) -> RandomDocuments:
        """Build the random documents for ``config`` (``dataset_path`` is always None for mock data)."""
        return RandomDocuments(vocab_size=config.tokenizer.vocab_size, eod=config.tokenizer.eod,
                               pad=getattr(config.tokenizer, "pad", None), seed=config.random_seed,
                               seq_length=config.sequence_length)
