"""Supervised finetuning datasets: rows in a known layout, a chat template, answer-only loss, packing."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from bridge_data.packing import PackedDataset
from bridge_data.samples import round_up, sequence_pieces, to_sample
from bridge_data.sft_schemas import SchemaName, get_schema
from bridge_data.sft_tokenize import tokenize_chat, tokenize_plain
from bridge_data.sources import check_split, detect_format, read_rows
from bridge_data.tokenizers import HFTokenizer, Tokenizer

logger = logging.getLogger(__name__)

Truncation = Literal["truncate", "drop", "fail"]


@dataclass(kw_only=True, slots=True)
class SFTDataConfig:
    """SFT data: where the rows are, how to read them, and how to turn them into samples."""

    path: str
    """Training rows: a JSONL file, a Parquet file or a local HF ``datasets`` directory."""

    seq_length: int
    """Maximum tokens per sample (and the row length when packing)."""

    valid_path: str | None = None
    """Validation rows (same formats). None: no validation set unless ``split`` carves one."""

    test_path: str | None = None
    """Test rows (same formats). None: no test set unless ``split`` carves one."""

    split: str | None = None
    """Carve valid/test out of ``path``, e.g. ``"90,5,5"`` (seeded shuffle of rows). Not with valid/test_path."""

    hf_split: str = "train"
    """Split to read from HF ``DatasetDict`` directories; another split is refused when no path is one."""

    schema: SchemaName = "auto"
    """Row layout (see :mod:`bridge_data.sft_schemas`): auto, messages, sharegpt, prompt_completion, alpaca, squad,
    gsm8k."""

    use_chat_template: bool = True
    """Render rows with the tokenizer's chat template; False: ``[bos] prompt separator completion eod``."""

    answer_only_loss: bool = True
    """Train only on assistant / answer tokens; False trains on every token."""

    truncation: Truncation = "truncate"
    """Rows longer than ``seq_length``: cut them (``truncate``), skip them (``drop``) or raise (``fail``)."""

    pad_to_multiple_of: int = 1
    """Pad every sequence (a sample, or a document in a packed row) to a multiple of this (TP/SP/CP)."""

    pad_to_seq_length: bool = True
    """Pad unpacked samples to ``seq_length`` (static shapes); False pads to the multiple only."""

    packed: bool = False
    """Pack several rows per ``seq_length`` sample (first-fit-decreasing) with per-document attention."""

    seed: int = 1234
    """Seed of the ``split`` carving and of the epoch shuffles when sample counts are requested."""

    separator: str = "\n"
    """Text between prompt and completion without a chat template."""

    add_bos: bool = True
    """Prepend the tokenizer's bos id without a chat template (chat templates place their own)."""

    def __post_init__(self) -> None:
        problems = self._field_problems()
        if problems:
            raise ValueError("Invalid SFTDataConfig: " + "; ".join(problems))

    def _field_problems(self) -> list[str]:
        """Each field on its own (again at finalize(): overrides assign fields after construction)."""
        problems = []
        if self.seq_length < 2:
            problems.append(f"seq_length must be >= 2, got {self.seq_length}")
        if self.truncation not in ("truncate", "drop", "fail"):
            problems.append(f"truncation must be 'truncate', 'drop' or 'fail', got {self.truncation!r}")
        if self.pad_to_multiple_of < 1:
            problems.append(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        elif self.seq_length % self.pad_to_multiple_of:  # else a row cut to seq_length pads past it
            problems.append(f"seq_length {self.seq_length} must be a multiple of pad_to_multiple_of "
                            f"{self.pad_to_multiple_of}")
        return problems

    def finalize(self) -> None:
        """Check the fields together (one ValueError listing every problem), then that the data files exist
        (FileNotFoundError naming them)."""
        problems = self._field_problems()
        if self.split is not None and (self.valid_path or self.test_path):
            problems.append("split carves valid/test from path; do not also set valid_path/test_path")
        if self.split is not None:
            parts = _parse_split(self.split)
            if parts is None:
                problems.append(f"split must be 3 comma-separated non-negative numbers, got {self.split!r}")
        if self.packed and not self.pad_to_seq_length:
            problems.append("pad_to_seq_length=False applies to unpacked samples (packed rows are always seq_length "
                            "long); set packed=False, or drop pad_to_seq_length")
        plain = [f"{name}={getattr(self, name)!r}" for name, default in (("separator", "\n"), ("add_bos", True))
                 if getattr(self, name) != default]
        if self.use_chat_template and plain:
            problems.append(f"{', '.join(plain)} applies without a chat template (the template places its own "
                            "tokens); set use_chat_template=False, or drop it")
        if problems:
            raise ValueError("Invalid SFTDataConfig: " + "; ".join(problems))
        missing = [f"{name} {str(path)!r}" for name, path in
                   (("path", self.path), ("valid_path", self.valid_path), ("test_path", self.test_path))
                   if isinstance(path, str | os.PathLike) and not os.path.exists(path)]
        if missing:  # before a model is built for data that is not there
            raise FileNotFoundError(f"SFT data {', '.join(missing)} does not exist")
        check_split(self.hf_split, [self.path, self.valid_path, self.test_path], "hf_split")

    def build(self, tokenizer: Tokenizer, *, train_samples: int | None = None, valid_samples: int | None = None,
              test_samples: int | None = None) -> tuple[torch.utils.data.Dataset | None, ...]:
        """Read, tokenize and (optionally) pack the rows into train, valid and test datasets.

        Args:
            tokenizer: An HF tokenizer (with a chat template when ``use_chat_template``).
            train_samples: Length the train dataset should have: epochs are repeated, each in a fresh seeded
                order. None: one epoch in file order (shuffle in the sampler).
            valid_samples: Likewise for validation.
            test_samples: Likewise for test.

        Returns:
            ``(train, valid, test)``, None for a split without data.

        Raises:
            FileNotFoundError: If a data file is missing.
            ValueError: On an invalid config, a tokenizer that cannot do the job (no chat template for chat
                data, the null tokenizer), malformed rows, over-long rows with ``truncation="fail"``, or a
                split without usable rows.
        """
        self.finalize()
        if not isinstance(tokenizer, HFTokenizer):
            raise ValueError(f"SFT data needs an HF tokenizer to read text, got {tokenizer!r}")
        for p in (self.path, self.valid_path, self.test_path):
            if p is not None:
                detect_format(p)
        if self.use_chat_template and not tokenizer.chat_template:
            raise ValueError(
                f"Tokenizer {tokenizer.name_or_path} has no chat template, needed for the chat data in {self.path}; "
                "give TokenizerConfig.chat_template (in a bridge-train config or override: tokenizer.chat_template), "
                "or set SFTDataConfig.use_chat_template=False (dataset.use_chat_template=false) for "
                "prompt/completion data"
            )
        if self.split is None:
            paths = (self.path, self.valid_path, self.test_path)
            sources = [read_rows(p, split=self.hf_split) if p else None for p in paths]
        else:
            paths = (self.path,) * 3
            sources = _carve(read_rows(self.path, split=self.hf_split), _parse_split(self.split), self.seed)
        sizes = (train_samples, valid_samples, test_samples)
        out = []
        for i, (rows, size) in enumerate(zip(sources, sizes)):
            if not rows:
                out.append(None)
                continue
            dataset = self._make_dataset(tokenizer, rows, f"{('train', 'valid', 'test')[i]} rows of {paths[i]}")
            out.append(dataset if size is None else ResampledDataset(dataset, size, seed=self.seed + i))
        return tuple(out)

    def tokenize_rows(self, tokenizer: HFTokenizer, rows: Sequence[tuple[str, dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenize ``(where, row)`` pairs into ``(ids, target_mask)`` sequences, applying the truncation policy.

        Rows that end up without any target token (e.g. truncated before the answer) are skipped and counted.

        Raises:
            ValueError: On malformed rows, or a row over ``seq_length`` with ``truncation="fail"``.
        """
        return self._tokenize(tokenizer, rows)[0]

    def _tokenize(self, tokenizer: HFTokenizer, rows: Sequence[tuple[str, dict]]):
        """(sequences, rows dropped as too long, rows cut before their answer, rows without answer tokens)."""
        out, dropped, cut, no_target = [], 0, 0, 0
        for where, row in rows:
            schema = get_schema(self.schema, row, where)
            messages = schema.to_messages(row, where)
            if self.use_chat_template:
                ids, mask = tokenize_chat(tokenizer, messages, where=where)
            else:
                ids, mask = tokenize_plain(tokenizer, messages, separator=self.separator, add_bos=self.add_bos,
                                           where=where)
            if not self.answer_only_loss:
                mask = np.ones_like(mask)
            had_target = bool(mask[1:].any())
            if len(ids) > self.seq_length:
                if self.truncation == "fail":
                    raise ValueError(f"{where}: {len(ids)} tokens, more than seq_length={self.seq_length}; "
                                     "raise seq_length or set truncation to 'truncate' or 'drop'")
                if self.truncation == "drop":
                    dropped += 1
                    continue
                ids, mask = ids[: self.seq_length], mask[: self.seq_length]
            if not mask[1:].any():
                cut, no_target = cut + had_target, no_target + (not had_target)
                continue
            out.append((ids, mask))
        if dropped or cut or no_target:
            logger.warning("%d rows longer than seq_length=%d dropped, %d rows cut to seq_length before their answer "
                           "and %d rows without answer tokens skipped", dropped, self.seq_length, cut, no_target)
        return out, dropped, cut, no_target

    def _make_dataset(self, tokenizer: HFTokenizer, rows: list[tuple[str, dict]], what: str):
        sequences, dropped, cut, no_target = self._tokenize(tokenizer, rows)
        if not sequences:
            reasons = [f"{dropped} are longer than seq_length={self.seq_length} (truncation='drop' skips them)",
                       f"{cut} lose their whole answer when cut to seq_length={self.seq_length} (the prompt fills it)",
                       f"{no_target} have no answer tokens"]
            counts = (dropped, cut, no_target)
            fix = "raise seq_length" if dropped or cut else "check the rows' answers"
            raise ValueError(f"No usable {what}: of {len(rows)} rows, "
                             + ", ".join(r for r, n in zip(reasons, counts) if n) + f"; {fix}")
        if self.packed:
            return PackedDataset(sequences, seq_length=self.seq_length, pad_id=tokenizer.pad,
                                 pad_to_multiple_of=self.pad_to_multiple_of)
        length = self.seq_length if self.pad_to_seq_length else None
        return SFTDataset(sequences, pad_id=tokenizer.pad, length=length, pad_to_multiple_of=self.pad_to_multiple_of)


class SFTDataset(torch.utils.data.Dataset):
    """One sequence per sample, padded to ``length`` (or to a multiple of ``pad_to_multiple_of``).

    Args:
        sequences: ``(ids int64 [L], target_mask bool [L])`` per sample.
        pad_id: Id of padded positions.
        length: Fixed sample length; None pads each sample to ``round_up(L, pad_to_multiple_of)``.
        pad_to_multiple_of: See above.
    """

    def __init__(self, sequences: Sequence[tuple[np.ndarray, np.ndarray]], *, pad_id: int, length: int | None,
                 pad_to_multiple_of: int = 1) -> None:
        self.sequences = sequences
        self.pad_id = pad_id
        self.length = length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        ids, mask = self.sequences[idx]
        length = self.length or round_up(len(ids), self.pad_to_multiple_of)
        return to_sample(*sequence_pieces(ids, mask, length=length, pad_id=self.pad_id))


class ResampledDataset(torch.utils.data.Dataset):
    """``num_samples`` items drawn epoch by epoch from ``dataset``, each epoch in a fresh seeded order.

    Args:
        dataset: The map-style dataset to repeat.
        num_samples: Length of this dataset.
        seed: Seed of the epoch orders (epoch ``e`` uses ``(seed, e)``).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, num_samples: int, *, seed: int) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.dataset = dataset
        self.num_samples = num_samples
        self.seed = seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int):
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"index {idx} out of range for {self.num_samples} samples")
        epoch, pos = divmod(idx, len(self.dataset))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(len(self.dataset))
        return self.dataset[int(self._orders[epoch][pos])]


def _parse_split(split: str) -> list[float] | None:
    try:
        parts = [float(x) for x in split.split(",")]
    except ValueError:
        return None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        return None
    return [p / sum(parts) for p in parts]


def _carve(rows: list, fractions: list[float], seed: int) -> list[list]:
    """Split rows into train/valid/test by ``fractions`` after a seeded shuffle."""
    order = np.random.default_rng(seed).permutation(len(rows))
    bounds = np.round(np.cumsum([0.0, *fractions]) * len(rows)).astype(int)
    return [[rows[j] for j in order[bounds[k] : bounds[k + 1]]] for k in range(3)]
