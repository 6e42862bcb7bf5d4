"""Tokenize text corpora into megatron-core indexed datasets (``.bin`` + ``.idx``), one document per row.

Outputs are written under temporary names and renamed into place only once complete (see
:mod:`bridge_data.indexed_writer`): a crash never leaves a ``.bin``/``.idx`` pair that looks valid but is not,
existing outputs are replaced only with ``overwrite``, an input is never an output, and what a killed run left
behind is removed by the next run into the same prefix.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from bridge_data.indexed_writer import (
    IndexedWriter,
    OutputError,
    OutputExistsError,
    check_outputs,
    disk_error,
    remove_stale_temporaries,
)
from bridge_data.sources import check_split, count_rows, detect_format, get_field, iter_rows
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
    """Split to read from HF ``DatasetDict`` directories; another split is refused when no input is one."""

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
        if not self.append_eod and getattr(self.tokenizer, "eod_token", None) is not None:
            problems.append(f"tokenizer.eod_token ({self.tokenizer.eod_token!r}, --eod-token) names the token appended "
                            "after each document, but append_eod is False (--no-append-eod) appends none; drop one")
        if not self.output_prefix or os.fspath(self.output_prefix).endswith(("/", ".bin", ".idx")):
            problems.append(f"output_prefix must be a path prefix without .bin/.idx, got {self.output_prefix!r}")
        if problems:
            raise ValueError("Invalid PreprocessConfig: " + "; ".join(problems))
        self.tokenizer.finalize()
        self.inputs, self.output_prefix = [os.fspath(p) for p in self.inputs], os.fspath(self.output_prefix)


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
        OutputExistsError: (a ``FileExistsError``) if an output exists and ``cfg.overwrite`` is False.
        OutputError: (an ``OSError``) if an output is an input or inside one, or cannot be written (read-only
            directory, full disk: the message names the path and the bytes).
        ValueError: On a bad config, a row without a text key (naming file, row and key), non-string text,
            or inputs that hold no documents.
    """
    cfg.finalize()
    for path in cfg.inputs:
        detect_format(path)
    check_split(cfg.split, cfg.inputs, "split")
    prefixes = output_prefixes(cfg)
    check_outputs([p + ext for p in prefixes.values() for ext in (".bin", ".idx")], cfg.inputs,
                  overwrite=cfg.overwrite)
    made: list[str] = []  # the output directories this run creates, removed again if it fails
    try:
        for prefix in prefixes.values():
            _make_directory(os.path.dirname(os.path.abspath(prefix)), made)
            remove_stale_temporaries(prefix)
        return _preprocess(cfg, prefixes)
    except BaseException:
        for directory in reversed(made):
            with contextlib.suppress(OSError):  # only while empty: a directory someone else filled stays
                os.rmdir(directory)
        raise


def _make_directory(directory: str, made: list[str]) -> None:
    """Create ``directory`` and its missing parents, appending each one created to ``made`` (outermost first)."""
    missing, path = [], directory
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise OutputError(errno.ENOTDIR, f"cannot create the output directory {directory}: {path} is a file, not a "
                          "directory; choose another --output-prefix")
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        except OSError as exc:
            raise disk_error(exc, path) from exc
        made.append(path)


def _preprocess(cfg: PreprocessConfig, prefixes: dict[str, str]) -> list[PreprocessResult]:
    tokenizer = build_tokenizer(cfg.tokenizer)
    if cfg.prepend_bos and tokenizer.bos is None:
        raise ValueError(f"prepend_bos is set but tokenizer {tokenizer!r} has no bos token")
    dtype = _token_dtype(tokenizer.vocab_size)
    writers: dict[str, IndexedWriter] = {}
    skipped = dict.fromkeys(cfg.text_keys, 0)
    prefix_ids = [tokenizer.bos] if cfg.prepend_bos else []
    suffix_ids = [tokenizer.eod] if cfg.append_eod else []
    totals = [count_rows(p, split=cfg.split) for p in cfg.inputs]
    total = sum(totals) if all(t is not None for t in totals) else None
    try:
        for key, prefix in prefixes.items():
            writers[key] = IndexedWriter(prefix, dtype)
        with tqdm(total=total, unit="doc", desc="preprocess", disable=not cfg.progress) as bar:
            for encoded in _encode_chunks(cfg, tokenizer):
                for key, docs in encoded.items():
                    for ids in docs:
                        if not ids:
                            skipped[key] += 1
                            continue
                        _add(writers[key], prefix_ids + ids + suffix_ids, bar)
                bar.update(len(next(iter(encoded.values()))))
        empty = [key for key, w in writers.items() if w.num_documents == 0]
        if empty:
            raise ValueError(f"No documents to write for text key(s) {empty} from {cfg.inputs}: the inputs hold "
                             "no rows, or every text is empty")
        for writer in writers.values():  # every output complete on disk before any is renamed into place
            writer.finish()
        published: list[IndexedWriter] = []
        try:
            for writer in writers.values():
                writer.publish(overwrite=cfg.overwrite)
                published.append(writer)
        except OutputExistsError:  # another run wrote one of them meanwhile: take back the others
            for writer in published:
                writer.retract()
            raise
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


def _add(writer: IndexedWriter, ids: list[int], bar) -> None:
    """Append one document; on a full disk, estimate what the rest needs from the documents so far."""
    try:
        writer.add_document(ids)
    except OutputError as exc:
        done, total = writer.num_documents, bar.total
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and total and done:
            more = int(writer.bytes_written / done * (total - done))
            raise OutputError(exc.errno, f"{exc}; about {more:,} more bytes needed for the remaining "
                              f"{total - done:,} documents") from exc
        raise


def _token_dtype(vocab_size: int) -> type[np.number]:
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _row_chunks(cfg: PreprocessConfig) -> Iterator[list[tuple[str, list[str]]]]:
    """Chunks of rows, each row reduced to where it is and its texts (one per text key), checked as they are read."""
    chunk: list[tuple[str, list[str]]] = []
    for path in cfg.inputs:
        for where, row in iter_rows(path, columns=cfg.text_keys, split=cfg.split):
            chunk.append((where, [get_field(row, key, where) for key in cfg.text_keys]))
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


def _encode(tokenizer: Tokenizer, keys: list[str], chunk: list[tuple[str, list[str]]]) -> dict[str, list[list[int]]]:
    out = {}
    for k, key in enumerate(keys):
        try:
            out[key] = tokenizer.tokenize_batch([texts[k] for _, texts in chunk])
        except ValueError:  # a text this tokenizer refuses (the null tokenizer reads ids only): name its row
            for where, texts in chunk:
                try:
                    tokenizer.tokenize(texts[k])
                except ValueError as err:
                    raise ValueError(f"{where}: key {key!r}: {err}") from None
            raise
    return out


_WORKER: dict = {}


def _init_worker(tokenizer_cfg: TokenizerConfig, keys: list[str]) -> None:
    _WORKER["tokenizer"] = build_tokenizer(tokenizer_cfg)
    _WORKER["keys"] = keys


def _encode_in_worker(chunk: list[list[str]]) -> dict[str, list[list[int]]]:
    return _encode(_WORKER["tokenizer"], _WORKER["keys"], chunk)


