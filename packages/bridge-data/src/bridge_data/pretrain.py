"""Pretraining datasets: indexed ``.bin/.idx`` data (one prefix or a weighted blend) or mock data, split into
train/valid/test and sampled by megatron-core's ``BlendedMegatronDatasetBuilder`` and ``GPTDataset``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bridge_data.samples import to_sample
from bridge_data.tokenizers import Tokenizer

_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_HEAD_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_ITEM_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's DType codes: bytes per token


@dataclass(kw_only=True, slots=True)
class PretrainDataConfig:
    """Pretraining data: indexed datasets (or mock data) cut into ``seq_length`` samples."""

    seq_length: int
    """Tokens per sample."""

    paths: list[str] = field(default_factory=list)
    """Indexed dataset prefixes (``PREFIX.bin`` + ``PREFIX.idx``, as written by ``bridge-data preprocess``).
    Empty: mock data."""

    weights: list[float] | None = None
    """Blend weights, one per path (normalized). None: weight by dataset size."""

    split: str = "98,1,1"
    """Train/valid/test proportions of the documents of every path (another split with mock data is refused)."""

    seed: int = 1234
    """Seed of megatron-core's document and sample shuffling (and of the mock documents)."""

    cache_dir: str | None = None
    """Where megatron-core caches its sample indices. None: ``PREFIX/cache/GPTDataset_indices`` (a directory
    named after each prefix) for real data, no cache for mock data. It must be writable unless it already holds
    the indices (read-only data needs a ``cache_dir``); :meth:`finalize` refuses one that cannot be created."""

    mock: bool = False
    """Use deterministic random-token data and read no files. Set by :meth:`finalize` when ``paths`` is empty."""

    eod_mask_loss: bool = False
    """Do not train on predicting the token after an eod (loss mask 0 at eod inputs)."""

    reset_position_ids: bool = False
    """Restart position ids after every eod."""

    document_attention: bool = False
    """Keep attention within documents: samples carry ``cu_seqlens`` at eod boundaries and positions restart. The
    eod position's target stays the next document's first token; ``eod_mask_loss`` drops it."""

    num_dataset_builder_threads: int = 1
    """Threads megatron-core uses to build the per-prefix datasets of a blend."""

    def __post_init__(self) -> None:
        problems = self._field_problems()
        if problems:
            raise ValueError("Invalid PretrainDataConfig: " + "; ".join(problems))

    def _field_problems(self) -> list[str]:
        """Each field on its own (again at finalize(): overrides assign fields after construction)."""
        return [f"{name} must be >= 1, got {getattr(self, name)}" for name in ("seq_length",
                "num_dataset_builder_threads") if getattr(self, name) < 1]

    def finalize(self) -> None:
        """Derive ``mock``, check the fields together (one ValueError listing every problem), then that every
        indexed dataset is there (FileNotFoundError / ValueError naming it, as :func:`check_indexed_dataset`)."""
        problems = self._field_problems()
        if not self.paths:
            self.mock = True
        elif self.mock:
            problems.append(f"mock is True and paths is set ({list(self.paths)}): real data and random mock tokens "
                            "at once; set mock=False to train on the paths, or paths=[] for mock data")
        if self.mock:  # what only real data reads
            unread = [f"{name}={getattr(self, name)!r}" for name, default in (
                ("weights", None), ("split", "98,1,1"), ("cache_dir", None), ("num_dataset_builder_threads", 1))
                if getattr(self, name) != default]
            if unread:
                problems.append(f"{', '.join(unread)} applies to real data (paths), not to mock data (every split "
                                "has mock samples); set paths, or drop it")
        if self.weights is not None and not self.mock:
            if len(self.weights) != len(self.paths):
                problems.append(f"weights has {len(self.weights)} entries for {len(self.paths)} paths")
            if any(w <= 0 for w in self.weights):
                problems.append(f"weights must all be > 0, got {self.weights}")
        try:
            parts = [float(x) for x in self.split.split(",")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
            problems.append(f"split must be up to 3 comma-separated non-negative numbers like '98,1,1', "
                            f"got {self.split!r}")
        if problems:
            raise ValueError("Invalid PretrainDataConfig: " + "; ".join(problems))
        for prefix in self.paths if not self.mock else ():  # before a model is built for data that is not there
            check_indexed_dataset(str(prefix))
        for directory in self._cache_dirs():
            blocker = _uncreatable(directory)
            if blocker is not None:
                why = "is not a directory" if not os.path.isdir(blocker) else "is not writable"
                raise PermissionError(_cache_message(directory, f"{blocker} {why}"))

    def _cache_dirs(self) -> list[str]:
        """Where megatron-core writes its sample indices: ``cache_dir``, else a directory beside each prefix."""
        if self.mock:
            return []
        if self.cache_dir is not None:
            return [str(self.cache_dir)]
        return [os.path.join(str(p), "cache", "GPTDataset_indices") for p in self.paths]

    def build(self, tokenizer: Tokenizer, *, train_samples: int | None, valid_samples: int | None,
              test_samples: int | None) -> tuple[PretrainDataset | None, PretrainDataset | None,
                                                 PretrainDataset | None]:
        """Build the train, valid and test datasets through megatron-core's builder.

        With ``torch.distributed`` initialized, call this on every rank: rank 0 builds (and caches) the indices
        first, the others follow after a barrier.

        Args:
            tokenizer: Supplies ``vocab_size``, ``eod`` and ``pad``.
            train_samples: Samples the trainer will draw (datasets repeat epochs to reach it). None: one epoch
                (not allowed with ``weights``).
            valid_samples: Likewise for validation.
            test_samples: Likewise for test.

        Returns:
            ``(train, valid, test)``; a split with no share in ``split`` is None.

        Raises:
            FileNotFoundError: If a ``.bin``/``.idx`` file is missing.
            ValueError: On an invalid config, an empty or corrupt index, or weights without sample counts.
        """
        self.finalize()
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

        from bridge_data.mock import RandomMockGPTDataset

        sizes = [train_samples, valid_samples, test_samples]
        fingerprints = {}
        if not self.mock:
            if self.weights is not None and None in sizes:
                raise ValueError("PretrainDataConfig.weights needs train_samples, valid_samples and test_samples; "
                                 f"got {sizes}")
            for prefix in self.paths:
                sequences, fingerprints[str(prefix)] = _read_index(prefix)
                self._check_split_sizes(prefix, sequences)
        dataset_class, config_class = _fingerprinted_gpt_dataset()
        config = config_class(
            index_fingerprints=fingerprints,
            random_seed=self.seed,
            sequence_length=self.seq_length,
            blend=None if self.mock else ([str(p) for p in self.paths], self.weights),
            split=None if self.mock else self.split,
            path_to_cache=self.cache_dir,
            tokenizer=_MegatronTokenizerView(tokenizer),
            reset_position_ids=self.reset_position_ids,
            reset_attention_mask=False,
            eod_mask_loss=self.eod_mask_loss,
            create_attention_mask=False,
            inter_document_masking=self.document_attention,
            num_dataset_builder_threads=self.num_dataset_builder_threads,
        )
        cls = RandomMockGPTDataset if self.mock else dataset_class
        try:
            datasets = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
        except Exception as err:  # megatron-core wraps a failed cache write on rank 0 in a bare Exception
            cause = err if isinstance(err, OSError) else err.__cause__
            where = getattr(cause, "filename", None)
            cache = next((d for d in self._cache_dirs() if where and os.path.abspath(str(where)).startswith(
                os.path.abspath(d))), None) if isinstance(cause, OSError) else None
            if cache is None:
                raise
            raise type(cause)(cause.errno, _cache_message(cache, cause.strerror or str(cause)), where) from err
        return tuple(None if d is None else PretrainDataset(d, self.seq_length) for d in datasets)


    def _check_split_sizes(self, prefix: str, num_documents: int) -> None:
        """Refuse splits that would get no documents (megatron-core would loop forever looking for tokens)."""
        from megatron.core.datasets.blended_megatron_dataset_config import (
            convert_split_vector_to_split_matrix,
            parse_and_normalize_split,
        )

        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(self.split))
        for name, bounds in zip(("train", "valid", "test"), matrix):
            if bounds is not None and round(bounds[1] * num_documents) == round(bounds[0] * num_documents):
                raise ValueError(
                    f"split={self.split!r} leaves the {name} split of {prefix!r} ({num_documents} documents) empty; "
                    "use more documents, or a split that gives it none (e.g. '100,0,0')"
                )


@functools.cache
def _fingerprinted_gpt_dataset() -> tuple[type, type]:
    """megatron-core's ``GPTDataset`` and its config, with the indexed files' fingerprints in the key of the
    sample-index cache: the key was the paths, seed, lengths and tokenizer, so data rewritten under the same prefix
    (``bridge-data preprocess --overwrite``) was sampled by the old data's cached indices (samples cut at the old
    documents' bounds, reads past the end)."""
    from megatron.core.datasets import gpt_dataset

    @dataclass
    class GPTDatasetConfig(gpt_dataset.GPTDatasetConfig):
        index_fingerprints: dict[str, str] = field(default_factory=dict)
        """The :func:`_read_index` fingerprint of every prefix of the blend."""

    class GPTDataset(gpt_dataset.GPTDataset):  # megatron-core names its cache files after the class
        @staticmethod
        def _key_config_attributes() -> list[str]:
            return [*gpt_dataset.GPTDataset._key_config_attributes(), "index_fingerprints"]

    return GPTDataset, GPTDatasetConfig


class PretrainDataset(torch.utils.data.Dataset):
    """A megatron-core GPT (or blended) dataset returning contract samples (see :mod:`bridge_data.samples`).

    Args:
        megatron_dataset: A ``GPTDataset``, ``MockGPTDataset`` or ``BlendedDataset`` built without attention
            masks.
        seq_length: The sample length.
    """

    def __init__(self, megatron_dataset: Any, seq_length: int) -> None:
        self.megatron_dataset = megatron_dataset
        """The wrapped megatron-core dataset."""
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.megatron_dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = self.megatron_dataset[idx]
        cu_seqlens = None
        if "cu_seqlens" in item:
            # megatron-core pads cu_seqlens to seq_length + 1 entries with seq_length; keep up to the first.
            cu = np.asarray(item["cu_seqlens"])
            cu_seqlens = cu[: int(np.argmax(cu == self.seq_length)) + 1]
        return to_sample(item["tokens"], item["labels"], item["loss_mask"], item["position_ids"], cu_seqlens)


def _uncreatable(directory: str) -> str | None:
    """The existing ancestor that keeps ``directory`` from being created (not writable), or None: it exists
    (megatron-core reads its indices from there, and writes only those it lacks) or can be made."""
    path = os.path.abspath(directory)
    if os.path.isdir(path):
        return None
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return None if os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK) else path


def _cache_message(directory: str, why: str) -> str:
    return (f"cannot write megatron-core's sample-index cache {directory}: {why} (read-only data?); set "
            "PretrainDataConfig.cache_dir (dataset.cache_dir=... in overrides) to a writable directory")


def check_indexed_dataset(prefix: str) -> int:
    """Check that ``prefix.bin``/``prefix.idx`` exist and hold documents; return the number of sequences
    (megatron-core splits GPT data by sequence; ``bridge-data preprocess`` writes one per document).

    Raises:
        FileNotFoundError: Naming the missing file(s).
        ValueError: If the index is not a megatron-core index, or holds no documents.
    """
    return _read_index(prefix)[0]


def _read_index(prefix: str) -> tuple[int, str]:
    """``(sequences, fingerprint)`` of ``prefix.idx`` (a digest of what megatron-core's sample indices are computed
    from: the sequence count and lengths, and the ``.bin`` size), checking the ``.bin`` holds every token it
    indexes. The config check and the build both ask: the files are read once while they stay the same."""
    prefix = os.fspath(prefix)
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"Indexed dataset {prefix!r} is incomplete: missing {missing}; write it with "
                                "`bridge-data preprocess --output-prefix PREFIX` (paths are given without .bin/.idx)")
    stats = [os.stat(prefix + ext) for ext in (".idx", ".bin")]
    return _index_summary(prefix, tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats))


@functools.lru_cache(maxsize=64)
def _index_summary(prefix: str, stats: tuple) -> tuple[int, str]:
    """:func:`_read_index` for files whose ``(inode, size, mtime)`` are ``stats`` (a rewrite changes them)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(prefix + ".idx", "rb") as f:
        head = f.read(_IDX_HEAD_BYTES)
        if len(head) < _IDX_HEAD_BYTES or head[:9] != _IDX_HEADER or head[17] not in _ITEM_SIZES:
            raise ValueError(f"{prefix}.idx is not a megatron-core index file (bad header)")
        sequences, document_bounds = struct.unpack("<QQ", head[18:34])
        if sequences == 0 or document_bounds <= 1:
            raise ValueError(f"Indexed dataset {prefix!r} holds no documents")
        tokens, left = 0, sequences * 4  # the int32 sequence lengths follow the header
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                raise ValueError(f"{prefix}.idx is truncated (its header counts {sequences:,} sequences)")
            digest.update(chunk)
            tokens += int(np.frombuffer(chunk, dtype=np.int32).sum(dtype=np.int64))
            left -= len(chunk)
    needed, size = tokens * _ITEM_SIZES[head[17]], os.path.getsize(prefix + ".bin")
    if size < needed:
        raise ValueError(f"{prefix}.bin is truncated ({size:,} bytes; its .idx indexes {needed:,}): copy it again, or "
                         "rewrite it with `bridge-data preprocess --overwrite`")
    digest.update(struct.pack("<QQ", sequences, size))
    return sequences, digest.hexdigest()


class _MegatronTokenizerView:
    """What megatron-core's GPT datasets read from a tokenizer.

    ``pad`` is reported only when it is a distinct token: megatron-core masks and zeroes pad ids, which must
    not hit real eod tokens. Otherwise it is -1 (megatron-core's "no pad" value).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.pad = -1 if tokenizer.pad == tokenizer.eod else tokenizer.pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        return self._tokenizer.unique_identifiers
