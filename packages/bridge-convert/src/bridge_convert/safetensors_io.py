"""HF checkpoint I/O: a lazy reader across shards and a streaming, shard-preserving writer.

The reader never loads a checkpoint whole: it opens each shard on first use and reads single tensors by name.
The writer receives tensors one by one (in whatever order the model yields them) and writes a shard file as soon
as every tensor that belongs to it has arrived, so memory holds about one shard at a time. With a source layout
(the HF checkpoint we imported from) each tensor goes back to its original file and the index is reproduced;
without one, files are cut by size and named like ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "LazyHFCheckpoint",
    "ShardedSafetensorsWriter",
    "SourceLayout",
    "atomic_output_dir",
    "parse_size",
]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"150KB"`` / an int of bytes -> bytes (decimal units, as transformers uses)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not match:
        raise ValueError(f"cannot parse a size from {size!r}; use e.g. '5GB', '500MB' or a byte count")
    value, unit = float(match.group(1)), (match.group(2) or "B")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(value * scale)


def _read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header and check that the file holds every byte it declares."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file is shorter than a safetensors header")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > size - 8:
                raise ValueError(f"header claims {header_len} bytes but the file has {size - 8}")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable safetensors file {path}: {exc}") from exc
    header.pop("__metadata__", None)
    data_len = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + data_len > size:
        raise ValueError(f"truncated safetensors file {path}: tensors need {8 + header_len + data_len} bytes, "
                         f"the file has {size}")
    return header


class LazyHFCheckpoint:
    """Read tensors by name from an HF checkpoint directory without loading it whole.

    Supports ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json`` and, as a
    fallback, PyTorch ``.bin`` files (loaded with ``weights_only=True`` and memory-mapped).

    Raises:
        FileNotFoundError: if the directory holds no weights, or an index names a file that is missing.
        ValueError: for an unreadable or truncated file (the file is named).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory not found: {self.path}")
        self._handles: dict[str, object] = {}
        self._headers: dict[str, dict] = {}
        self._bin_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.format, self.weight_map, self.index_metadata = self._discover()
        for file in sorted(set(self.weight_map.values())):
            if not (self.path / file).exists():
                raise FileNotFoundError(f"{self.path / file} is listed in the checkpoint index but missing")
            if self.format == "safetensors":
                self._headers[file] = _read_safetensors_header(self.path / file)
        if self.format == "safetensors":
            for name, file in self.weight_map.items():
                if name not in self._headers[file]:
                    raise ValueError(f"{self.path / file} does not contain {name!r}, which the index places there")

    def _discover(self) -> tuple[str, dict[str, str], dict]:
        for index_name, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            index = self.path / index_name
            if index.exists():
                try:
                    data = json.loads(index.read_text())
                    return fmt, dict(data["weight_map"]), dict(data.get("metadata", {}))
                except (ValueError, KeyError) as exc:
                    raise ValueError(f"unreadable checkpoint index {index}: {exc}") from exc
        single = self.path / SAFE_SINGLE
        if single.exists():
            header = _read_safetensors_header(single)
            return "safetensors", {name: SAFE_SINGLE for name in header}, {}
        single_bin = self.path / BIN_SINGLE
        if single_bin.exists():
            tensors = self._load_bin(BIN_SINGLE, single_bin)
            return "bin", {name: BIN_SINGLE for name in tensors}, {}
        raise FileNotFoundError(
            f"no weights in {self.path}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")

    def _load_bin(self, file: str, path: Path | None = None) -> dict[str, torch.Tensor]:
        if file not in self._bin_cache:
            try:
                self._bin_cache[file] = torch.load(path or self.path / file, map_location="cpu",
                                                   weights_only=True, mmap=True)
            except Exception as exc:
                raise ValueError(f"unreadable PyTorch checkpoint file {path or self.path / file}: {exc}") from exc
        return self._bin_cache[file]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    def dtype_of(self, name: str) -> torch.dtype:
        """The stored dtype of ``name``, read from the header (no data is loaded)."""
        if self.format == "safetensors":
            return _DTYPES[self._headers[self.weight_map[name]][name]["dtype"]]
        return self.get(name).dtype

    def shape_of(self, name: str) -> tuple[int, ...]:
        if self.format == "safetensors":
            return tuple(self._headers[self.weight_map[name]][name]["shape"])
        return tuple(self.get(name).shape)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a CPU tensor that owns its memory)."""
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.path}")
        file = self.weight_map[name]
        if self.format == "bin":
            return self._load_bin(file)[name].clone()
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(self.path / file), framework="pt", device="cpu")
            except Exception as exc:
                raise ValueError(f"unreadable safetensors file {self.path / file}: {exc}") from exc
            self._handles[file] = handle
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise ValueError(f"cannot read {name!r} from {self.path / file}: {exc}") from exc

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache.clear()


@dataclass(frozen=True)
class SourceLayout:
    """Where each tensor of a source checkpoint lived, in which dtype, and whether it had an index file."""

    weight_map: dict[str, str]
    dtypes: dict[str, torch.dtype]
    has_index: bool
    aliases: dict[str, list[str]] = field(default_factory=dict)
    """exported name -> extra names written with the same data (a tied ``lm_head.weight``)."""

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> SourceLayout | None:
        """The layout of a safetensors checkpoint directory; None for .bin checkpoints or no weights."""
        try:
            reader = LazyHFCheckpoint(path)
        except (FileNotFoundError, ValueError):
            return None
        if reader.format != "safetensors":
            return None
        return cls(dict(reader.weight_map), {n: reader.dtype_of(n) for n in reader.keys()},
                   (Path(path) / SAFE_INDEX).exists())

    def to_json(self) -> dict:
        return {"weight_map": self.weight_map, "has_index": self.has_index,
                "dtypes": {n: str(d).removeprefix("torch.") for n, d in self.dtypes.items()}}

    @classmethod
    def from_json(cls, data: dict) -> SourceLayout:
        return cls(dict(data["weight_map"]), {n: getattr(torch, d) for n, d in data["dtypes"].items()},
                   bool(data["has_index"]))


class ShardedSafetensorsWriter:
    """Write tensors as they arrive into safetensors shards plus ``model.safetensors.index.json``.

    Args:
        out_dir: the (already existing, normally temporary) directory to write into.
        layout: name -> file of a source checkpoint. Every tensor goes to its file, which is written once all of
            its tensors arrived; the index reproduces the source's. Without it, shards are cut at ``max_shard_size``.
        max_shard_size: shard size limit without a layout.
        metadata: safetensors header metadata for every file (``{"format": "pt"}`` as transformers writes).
        write_index: write ``model.safetensors.index.json``; default: when there is more than one file.
    """

    def __init__(self, out_dir: str | os.PathLike, *, layout: dict[str, str] | None = None,
                 max_shard_size: int | str = "5GB", metadata: dict[str, str] | None = None,
                 write_index: bool | None = None) -> None:
        self.write_index = write_index
        self.out_dir = Path(out_dir)
        self.layout = dict(layout) if layout else None
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = metadata or {"format": "pt"}
        self._pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self._remaining: dict[str, set[str]] = defaultdict(set)
        if self.layout:
            for name, file in self.layout.items():
                self._remaining[file].add(name)
        self._written: dict[str, str] = {}
        self._sizes: dict[str, int] = {}
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._size_shards: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._written or any(name in p for p in self._pending.values()) or name in self._current:
            raise ValueError(f"tensor {name!r} was written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        if self.layout is not None:
            file = self.layout.get(name)
            if file is None:
                raise ValueError(f"tensor {name!r} has no place in the source checkpoint layout")
            self._pending[file][name] = tensor
            self._remaining[file].discard(name)
            if not self._remaining[file]:
                self._flush(file, self._pending.pop(file))
            return
        nbytes = tensor.numel() * tensor.element_size()
        if self._current and self._current_bytes + nbytes > self.max_shard_size:
            self._flush_size_shard()
        self._current[name] = tensor
        self._current_bytes += nbytes

    def _flush_size_shard(self) -> None:
        file = f"model-{len(self._size_shards) + 1:05d}.safetensors.part"
        self._size_shards.append(file)
        self._flush(file, self._current)
        self._current, self._current_bytes = {}, 0

    def _flush(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(self.out_dir / file), metadata=self.metadata)
        for name, t in tensors.items():
            self._written[name] = file
            self._sizes[name] = t.numel() * t.element_size()

    def close(self) -> dict[str, str]:
        """Write what is left and the index; returns the weight map.

        Raises:
            ValueError: with a source layout, if some of its tensors never arrived (they are named).
        """
        if self.layout is not None:
            missing = sorted(n for names in self._remaining.values() for n in names)
            if missing:
                raise ValueError(f"export is missing {len(missing)} tensors of the source layout: {missing[:20]}")
            weight_map = {name: self._written[name] for name in self.layout}
            files = set(weight_map.values())
        else:
            if self._current or not self._size_shards:
                self._flush_size_shard()
            total = len(self._size_shards)
            renames = {}
            for i, part in enumerate(self._size_shards, start=1):
                final = SAFE_SINGLE if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
                os.replace(self.out_dir / part, self.out_dir / final)
                renames[part] = final
            weight_map = {name: renames[file] for name, file in self._written.items()}
            files = set(weight_map.values())
        write_index = self.write_index if self.write_index is not None else len(files) > 1
        if write_index:
            index = {"metadata": {"total_size": sum(self._sizes.values())},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


@contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``path`` that replaces ``path`` only if the block succeeds.

    A failure (exception, interrupt) removes the temporary directory: no partial output is ever left behind.

    Raises:
        FileExistsError: if ``path`` exists, is not empty and ``overwrite`` is False.
    """
    target = Path(path).resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "prev")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
