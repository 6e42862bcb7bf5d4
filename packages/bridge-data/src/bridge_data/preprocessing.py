"""Tokenize text corpora into megatron-core indexed datasets (``.bin`` + ``.idx``), one document per row.

Outputs are written under temporary names and renamed into place only once complete; the ``.idx`` is renamed
last and any old ``.idx`` is removed first, so a crash never leaves a ``.bin``/``.idx`` pair that looks valid
but is not.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from bridge_data.sources import count_rows, detect_format, get_field, iter_rows
from bridge_data.tokenizers import Tokenizer, TokenizerConfig, build_tokenizer

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class PreprocessConfig:
    """What ``bridge-data preprocess`` does: inputs, text keys, tokenizer and output prefix."""

    inputs: list[str]
    """JSONL / Parquet files or HF ``datasets`` directories; their documents are written in this order."""

    output_prefix: str
    """Output path prefix: ``PREFIX.bin``/``PREFIX.idx`` for one text key, ``PREFIX_KEY.*`` for several."""

    tokenizer: TokenizerConfig
    """The tokenizer that turns text into ids."""

    text_keys: list[str] = field(default_factory=lambda: ["text"])
    """Row keys holding the text; each key gets its own indexed dataset."""

    append_eod: bool = True
    """Append the tokenizer's eod id after every document (the document boundary GPTDataset sees)."""

    prepend_bos: bool = False
    """Put the tokenizer's bos id in front of every document."""

    workers: int = 1
    """Tokenizer processes; 1 tokenizes in this process."""

    chunk_size: int = 256
    """Rows sent to a worker at a time."""

    split: str = "train"
    """Split to read from HF ``DatasetDict`` directories."""

    overwrite: bool = False
    """Replace existing outputs instead of refusing to."""

    progress: bool = True
    """Show a tqdm progress bar."""

    def finalize(self) -> None:
        """Check the config; raise one ValueError listing every problem."""
        problems = []
        if not self.inputs:
            problems.append("inputs is empty; give at least one file or directory")
        if not self.text_keys:
            problems.append("text_keys is empty")
        if len(set(self.text_keys)) != len(self.text_keys):
            problems.append(f"text_keys has duplicates: {self.text_keys}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if self.chunk_size < 1:
            problems.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.output_prefix or self.output_prefix.endswith(("/", ".bin", ".idx")):
            problems.append(f"output_prefix must be a path prefix without .bin/.idx, got {self.output_prefix!r}")
        if problems:
            raise ValueError("Invalid PreprocessConfig: " + "; ".join(problems))
        self.tokenizer.finalize()


@dataclass(kw_only=True, slots=True)
class PreprocessResult:
    """What was written for one text key."""

    prefix: str
    """Path prefix of the written ``.bin``/``.idx`` pair."""

    num_documents: int
    """Documents written."""

    num_tokens: int
    """Tokens written, eod/bos included."""

    skipped_empty: int
    """Rows whose text produced no tokens (not written)."""


def output_prefixes(cfg: PreprocessConfig) -> dict[str, str]:
    """The output prefix for each text key."""
    if len(cfg.text_keys) == 1:
        return {cfg.text_keys[0]: cfg.output_prefix}
    return {key: f"{cfg.output_prefix}_{key}" for key in cfg.text_keys}


def preprocess(cfg: PreprocessConfig) -> list[PreprocessResult]:
    """Tokenize ``cfg.inputs`` into one megatron-core indexed dataset per text key.

    Args:
        cfg: What to read, how to tokenize and where to write.

    Returns:
        One :class:`PreprocessResult` per text key, in ``cfg.text_keys`` order.

    Raises:
        FileNotFoundError: If an input does not exist.
        FileExistsError: If an output exists and ``cfg.overwrite`` is False.
        ValueError: On a bad config, a row without a text key (naming file, row and key), non-string text,
            or inputs that hold no documents.
    """
    cfg.finalize()
    for path in cfg.inputs:
        detect_format(path)
    prefixes = output_prefixes(cfg)
    for prefix in prefixes.values():
        for path in (prefix + ".bin", prefix + ".idx"):
            if os.path.exists(path) and not cfg.overwrite:
                raise FileExistsError(f"Output {path} exists; pass overwrite=True (--overwrite) to replace it")
        parent = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(parent, exist_ok=True)

    tokenizer = build_tokenizer(cfg.tokenizer)
    if cfg.prepend_bos and tokenizer.bos is None:
        raise ValueError(f"prepend_bos is set but tokenizer {tokenizer!r} has no bos token")
    dtype = _token_dtype(tokenizer.vocab_size)
    writers = {key: _AtomicIndexedWriter(prefix, dtype) for key, prefix in prefixes.items()}
    skipped = dict.fromkeys(cfg.text_keys, 0)
    prefix_ids = [tokenizer.bos] if cfg.prepend_bos else []
    suffix_ids = [tokenizer.eod] if cfg.append_eod else []
    totals = [count_rows(p, split=cfg.split) for p in cfg.inputs]
    total = sum(totals) if all(t is not None for t in totals) else None
    try:
        with tqdm(total=total, unit="doc", desc="preprocess", disable=not cfg.progress) as bar:
            for encoded in _encode_chunks(cfg, tokenizer):
                for key, docs in encoded.items():
                    for ids in docs:
                        if not ids:
                            skipped[key] += 1
                            continue
                        writers[key].add_document(prefix_ids + ids + suffix_ids)
                bar.update(len(next(iter(encoded.values()))))
        empty = [key for key, w in writers.items() if w.num_documents == 0]
        if empty:
            raise ValueError(f"No documents to write for text key(s) {empty} from {cfg.inputs}: the inputs hold "
                             "no rows, or every text is empty")
        for writer in writers.values():
            writer.commit()
    finally:
        for writer in writers.values():
            writer.discard()

    results = [
        PreprocessResult(prefix=prefixes[key], num_documents=w.num_documents, num_tokens=w.num_tokens,
                         skipped_empty=skipped[key])
        for key, w in writers.items()
    ]
    for r in results:
        logger.info("wrote %s.{bin,idx}: %d documents, %d tokens (%d empty rows skipped)",
                    r.prefix, r.num_documents, r.num_tokens, r.skipped_empty)
    return results


def _token_dtype(vocab_size: int) -> type[np.number]:
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _row_chunks(cfg: PreprocessConfig) -> Iterator[list[list[str]]]:
    """Chunks of rows, each row reduced to its texts (one per text key), checked as they are read."""
    chunk: list[list[str]] = []
    for path in cfg.inputs:
        for where, row in iter_rows(path, columns=cfg.text_keys, split=cfg.split):
            chunk.append([get_field(row, key, where) for key in cfg.text_keys])
            if len(chunk) == cfg.chunk_size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _encode_chunks(cfg: PreprocessConfig, tokenizer: Tokenizer) -> Iterator[dict[str, list[list[int]]]]:
    """Encoded chunks in input order, tokenized here or in ``cfg.workers`` spawned processes."""
    if cfg.workers == 1:
        for chunk in _row_chunks(cfg):
            yield _encode(tokenizer, cfg.text_keys, chunk)
        return
    # spawn, not fork: the parent may hold threads (torch, the Rust tokenizer pool) that fork would break.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg.tokenizer, cfg.text_keys)) as pool:
        yield from pool.imap(_encode_in_worker, _row_chunks(cfg), chunksize=1)


def _encode(tokenizer: Tokenizer, keys: list[str], chunk: list[list[str]]) -> dict[str, list[list[int]]]:
    return {key: tokenizer.tokenize_batch([texts[k] for texts in chunk]) for k, key in enumerate(keys)}


_WORKER: dict = {}


def _init_worker(tokenizer_cfg: TokenizerConfig, keys: list[str]) -> None:
    _WORKER["tokenizer"] = build_tokenizer(tokenizer_cfg)
    _WORKER["keys"] = keys


def _encode_in_worker(chunk: list[list[str]]) -> dict[str, list[list[int]]]:
    return _encode(_WORKER["tokenizer"], _WORKER["keys"], chunk)


class _AtomicIndexedWriter:
    """An ``IndexedDatasetBuilder`` writing to temporary files that :meth:`commit` renames into place."""

    def __init__(self, prefix: str, dtype: type[np.number]) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        directory, base = os.path.split(os.path.abspath(prefix))
        fd, self._tmp_bin = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".bin.tmp")
        os.close(fd)
        self._tmp_idx = self._tmp_bin[: -len(".bin.tmp")] + ".idx.tmp"
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=dtype)
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    def add_document(self, ids: list[int]) -> None:
        self._builder.add_document(np.asarray(ids), [len(ids)])
        self.num_documents += 1
        self.num_tokens += len(ids)

    def commit(self) -> None:
        self._builder.finalize(self._tmp_idx)
        for tmp in (self._tmp_bin, self._tmp_idx):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        final_idx = self.prefix + ".idx"
        # Remove the old index first: until the new one lands, no valid-looking pair exists.
        if os.path.exists(final_idx):
            os.unlink(final_idx)
        os.replace(self._tmp_bin, self.prefix + ".bin")
        os.replace(self._tmp_idx, final_idx)
        self._done = True

    def discard(self) -> None:
        """Remove the temporary files of an uncommitted writer (no-op after commit)."""
        if self._done:
            return
        if not self._builder.data_file.closed:
            self._builder.data_file.close()
        for tmp in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._done = True
