"""Data for the SFT and PEFT recipes: mock conversations by default, a file of chat rows, or a SQuAD-style
HF ``datasets`` directory, all through bridge-data (its packing, sample contract and SFT reader).

Mock SFT data needs no tokenizer files: each sequence is a random prompt followed by an answer that copies the
prompt's first tokens, then eod. Only the answer and the eod are trained on (as with real SFT data), and the copy
is learnable, so a run's loss falls. Sequences are packed into ``seq_length`` rows by bridge-data's
:class:`~bridge_data.PackedDataset` (per-document attention, positions restarting), like packed real data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MockSFTDataConfig", "sft_data_config"]

_POOL_ROWS = 256
"""Packed rows generated at most; longer runs repeat them in fresh seeded orders."""


@dataclass(kw_only=True, slots=True)
class MockSFTDataConfig:
    """Random prompt -> copied-answer sequences for SFT / PEFT benchmarks and tests (no files, no tokenizer)."""

    seq_length: int
    """Row length (packed) or sample length (unpacked)."""
    packed: bool = True
    """Pack several sequences per row (as the recipes' real data is); False: one sequence per sample."""
    min_length: int | None = None
    """Shortest sequence (prompt + answer + eod); None: ``seq_length // 8`` (at least 4)."""
    max_length: int | None = None
    """Longest sequence; None: ``seq_length // 2`` (at least ``min_length``)."""
    answer_fraction: float = 0.25
    """Share of each sequence that is answer (copied from the start of the prompt)."""
    pad_to_multiple_of: int = 1
    """Pad every sequence to a multiple of this (2 x context-parallel size, or TP with sequence parallelism)."""
    seed: int = 1234
    """Seed of the sequences and of the orders in which rows repeat."""

    def finalize(self) -> None:
        """Check the fields together; one ValueError lists every problem."""
        problems = []
        low, high = self._lengths()
        if self.seq_length < 4:
            problems.append(f"seq_length must be >= 4, got {self.seq_length}")
        if not 1 <= low <= high <= self.seq_length:
            problems.append(f"need 1 <= min_length ({low}) <= max_length ({high}) <= seq_length ({self.seq_length})")
        if not 0 < self.answer_fraction < 1:
            problems.append(f"answer_fraction must be in (0, 1), got {self.answer_fraction}")
        if self.pad_to_multiple_of < 1 or self.seq_length % self.pad_to_multiple_of:
            problems.append(f"seq_length ({self.seq_length}) must be a multiple of pad_to_multiple_of "
                            f"({self.pad_to_multiple_of})")
        if problems:
            raise ValueError("invalid MockSFTDataConfig: " + "; ".join(problems))

    def _lengths(self) -> tuple[int, int]:
        low = self.min_length if self.min_length is not None else max(self.seq_length // 8, 4)
        high = self.max_length if self.max_length is not None else max(self.seq_length // 2, low)
        return low, high

    def sequences(self, tokenizer: Any, count: int, stream: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``count`` ``(ids, target_mask)`` sequences of ``stream`` (0 train, 1 valid, 2 test)."""
        rng = np.random.default_rng((self.seed, stream))
        low, high = self._lengths()
        eod = int(tokenizer.eod)
        if tokenizer.vocab_size < 3:
            raise ValueError(f"mock SFT data needs a vocabulary of at least 3 ids, got {tokenizer.vocab_size}")
        out = []
        for _ in range(count):
            length = int(rng.integers(low, high + 1))
            answer = max(1, min(int(round(length * self.answer_fraction)), length - 2))
            prompt = length - answer - 1
            body = rng.integers(0, tokenizer.vocab_size - 1, size=prompt)
            body[body >= eod] += 1  # every id but eod
            copied = np.resize(body, answer)
            ids = np.concatenate([body, copied, [eod]]).astype(np.int64)
            mask = np.zeros(length, dtype=bool)
            mask[prompt:] = True
            out.append((ids, mask))
        return out

    def build(self, tokenizer: Any, *, train_samples: int | None = None, valid_samples: int | None = None,
              test_samples: int | None = None) -> tuple[Any, Any, Any]:
        """Train, valid and test datasets of exactly the requested sizes (None or 0: no such split).

        Args:
            tokenizer: Any bridge-data tokenizer (only ``vocab_size`` and ``eod`` are read).
        """
        from bridge_data import PackedDataset
        from bridge_data.sft import ResampledDataset, SFTDataset

        self.finalize()
        low, high = self._lengths()
        per_row = max(self.seq_length // ((low + high) // 2), 1) if self.packed else 1
        out = []
        for stream, size in enumerate((train_samples, valid_samples, test_samples)):
            if not size:
                out.append(None)
                continue
            sequences = self.sequences(tokenizer, min(size, _POOL_ROWS) * per_row, stream)
            if self.packed:
                pool = PackedDataset(sequences, seq_length=self.seq_length, pad_id=tokenizer.pad,
                                     pad_to_multiple_of=self.pad_to_multiple_of)
            else:
                pool = SFTDataset(sequences, pad_id=tokenizer.pad, length=self.seq_length,
                                  pad_to_multiple_of=self.pad_to_multiple_of)
            out.append(ResampledDataset(pool, size, seed=self.seed + stream))
        return tuple(out)


def sft_data_config(*, seq_length: int, data_path: str | None, data_format: str, packed: bool,
                    pad_to_multiple_of: int, seed: int) -> Any:
    """The dataset section of an SFT / PEFT recipe.

    Args:
        seq_length: Row length.
        data_path: None for mock data; else a JSONL / Parquet file or an HF ``datasets`` directory.
        data_format: ``chat`` (rows of ``messages`` rendered with the tokenizer's chat template; any layout
            bridge-data detects), or ``squad`` (SQuAD-style ``context`` / ``question`` / ``answers`` rows, e.g.
            ``load_dataset("squad").save_to_disk(DIR)``, turned into prompt / completion text without a chat
            template: base models have none).
        packed: Pack sequences into ``seq_length`` rows.
        pad_to_multiple_of: Per-sequence padding multiple (context / sequence parallelism).
        seed: Data seed.

    Raises:
        ValueError: for an unknown ``data_format``.
    """
    if data_path is None:
        return MockSFTDataConfig(seq_length=seq_length, packed=packed, pad_to_multiple_of=pad_to_multiple_of,
                                 seed=seed)
    from bridge_data import SFTDataConfig

    if data_format == "chat":
        return SFTDataConfig(path=data_path, seq_length=seq_length, packed=packed, seed=seed,
                             pad_to_multiple_of=pad_to_multiple_of)
    if data_format == "squad":
        return SFTDataConfig(path=data_path, seq_length=seq_length, packed=packed, seed=seed, schema="squad",
                             use_chat_template=False, pad_to_multiple_of=pad_to_multiple_of)
    raise ValueError(f"data_format must be 'chat' or 'squad', got {data_format!r}")
