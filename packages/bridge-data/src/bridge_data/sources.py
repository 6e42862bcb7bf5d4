"""Read rows from JSON Lines files, JSON array files, Parquet files and local HF ``datasets`` directories
(``save_to_disk`` output). JSON files may be compressed (``.gz``, ``.bz2``, ``.xz``) and may start with a UTF-8 BOM.

Every row comes with a ``where`` string ("data.jsonl:7", "data.json item 3", "data.parquet row 6") so that errors
about a row can name the file and the row.
"""

from __future__ import annotations

import bz2
import gzip
import itertools
import json
import lzma
import os
from collections.abc import Iterator
from typing import Any, Literal

SourceFormat = Literal["jsonl", "parquet", "hf"]

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def check_split(split: str, paths: list, name: str) -> None:
    """Refuse a split other than ``train`` (the default) when no path is an HF ``DatasetDict`` directory: no input
    would read it.

    Raises:
        ValueError: naming the option (``name``) and the inputs.
    """
    given = [os.fspath(p) for p in paths if p is not None]
    if split != "train" and not any(os.path.isfile(os.path.join(p, "dataset_dict.json")) for p in given):
        raise ValueError(f"{name} {split!r} picks a split of an HF DatasetDict directory (DatasetDict.save_to_disk), "
                         f"but none of {given} is one; drop {name}")


def _compression(path: str) -> str | None:
    return next((suffix for suffix in _COMPRESSED if path.lower().endswith(suffix)), None)


def detect_format(path: str) -> SourceFormat:
    """Say how to read ``path``: a JSONL file, a Parquet file, or an HF ``datasets`` directory.

    Args:
        path: A file or directory.

    Returns:
        ``"jsonl"``, ``"parquet"`` or ``"hf"``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``path`` is neither a known file type nor an HF ``datasets`` directory.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Input {path!r} does not exist")
    if os.path.isdir(path):
        markers = ("dataset_dict.json", "state.json", "dataset_info.json")
        if any(os.path.exists(os.path.join(path, m)) for m in markers):
            return "hf"
        raise ValueError(
            f"Directory {path!r} is not an HF datasets directory (no dataset_dict.json or state.json); "
            "pass a .jsonl/.parquet file or the output of Dataset.save_to_disk"
        )
    lower = path.lower().removesuffix(_compression(path) or "")
    if lower.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    raise ValueError(f"Cannot tell the format of {path!r}: expected .jsonl/.json/.ndjson (optionally .gz/.bz2/.xz), "
                     ".parquet or an HF datasets directory")


def count_rows(path: str, *, split: str = "train") -> int | None:
    """Number of rows in ``path`` when it is cheap to know (Parquet metadata, HF datasets), else None."""
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt == "hf":
        return len(_load_hf(path, split))
    return None


def iter_rows(path: str, *, columns: list[str] | None = None, split: str = "train") -> Iterator[tuple[str, dict]]:
    """Yield ``(where, row)`` for every row of ``path``, in order.

    Args:
        path: A JSON Lines / JSON array file (optionally compressed), a Parquet file or an HF ``datasets``
            directory.
        columns: Columns to read (Parquet and HF datasets check that they exist up front; JSONL rows are
            checked by the caller, row by row). None reads every column.
        split: The split to read when ``path`` holds a ``DatasetDict``.

    Yields:
        ``where`` names the file and row (``"file.jsonl:7"`` is line 7; ``"file.json item 3"`` and
            ``"file.parquet row 6"`` are 0-based),
        ``row`` is a dict of column values.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On malformed JSON, a non-object JSON line, a missing column or a missing split.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "jsonl":
        yield from _iter_jsonl(path)
    elif fmt == "parquet":
        yield from _iter_parquet(path, columns)
    else:
        dataset = _load_hf(path, split)
        _check_columns(path, dataset.column_names, columns)
        if columns is not None:
            dataset = dataset.select_columns(columns)
        for i, row in enumerate(dataset):
            yield f"{path} row {i}", row


def read_rows(path: str, *, columns: list[str] | None = None, split: str = "train") -> list[tuple[str, dict]]:
    """All rows of ``path`` as a list (see :func:`iter_rows`); raises ValueError if there are none."""
    rows = list(iter_rows(path, columns=columns, split=split))
    if not rows:
        raise ValueError(f"Input {path!r} holds no rows")
    return rows


def get_field(row: dict, key: str, where: str, *, kind: type | tuple[type, ...] = str) -> Any:
    """``row[key]``, checked to exist and to be of ``kind``.

    Raises:
        ValueError: Naming ``where``, the key and the row's keys, if the key is missing or has another type.
    """
    if key not in row:
        raise ValueError(f"{where}: no key {key!r}; the row has keys {sorted(row)}")
    value = row[key]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: key {key!r} holds {type(value).__name__}, expected {expected}")
    return value


def _open_bytes(path: str):
    """``path`` as bytes, decompressed by its suffix (lines are decoded one by one, so an error names its line)."""
    opener = _COMPRESSED.get(_compression(path) or "", open)
    return opener(path, "rb")


def _iter_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """JSON Lines; a ``.json`` file whose text is one JSON array (``[{...}, {...}]``, as alpaca_data.json) is
    read as that array. Read as a stream (a FIFO or ``/dev/stdin`` works): nothing is read twice."""
    array_ok = path.lower().removesuffix(_compression(path) or "").endswith(".json")
    with _open_bytes(path) as f:
        lines = _read_lines(path, f)
        head = []  # the leading blank lines and the first line with text
        for line in lines:
            head.append(line)
            if line.strip():
                break
        if array_ok and head and head[-1].lstrip().startswith("["):
            yield from _iter_json_array(path, "".join(itertools.chain(head, lines)))
            return
        for lineno, line in enumerate(itertools.chain(head, lines), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            yield where, row


def _read_lines(path: str, f) -> Iterator[str]:
    """The lines of binary file ``f`` as text; a UTF-8 byte-order mark is skipped."""
    try:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start} of the line); "
                                 "re-encode the file as UTF-8") from None
    except (OSError, EOFError, lzma.LZMAError) as err:  # corrupt / truncated compressed data
        raise ValueError(f"{path}: cannot read it ({err})") from None


def _iter_json_array(path: str, text: str) -> Iterator[tuple[str, dict]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path} item {i}: expected a JSON object in the array, got {type(row).__name__}")
        yield f"{path} item {i}", row


def _iter_parquet(path: str, columns: list[str] | None) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    _check_columns(path, parquet.schema_arrow.names, columns)
    i = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for row in batch.to_pylist():
            yield f"{path} row {i}", row
            i += 1


def _load_hf(path: str, split: str):
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(path)
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path!r} has splits {sorted(dataset)}, not {split!r}; choose one of them")
        dataset = dataset[split]
    return dataset


def _check_columns(path: str, available: list[str], wanted: list[str] | None) -> None:
    missing = [c for c in wanted or [] if c not in available]
    if missing:
        raise ValueError(f"{path!r} has no column(s) {missing}; its columns are {sorted(available)}")
