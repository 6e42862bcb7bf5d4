"""HF checkpoint I/O: a lazy reader across shards and a streaming, shard-preserving writer.

The reader never loads a checkpoint whole: it opens each shard on first use and reads single tensors by name.
The writer receives tensors one by one (in whatever order the model yields them) and writes a shard file as soon
as every tensor that belongs to it has arrived, so memory holds about one shard at a time. With a source layout
(the HF checkpoint we imported from) each tensor goes back to its original file and the index is reproduced;
without one, files are cut by size and named like ``save_pretrained`` does.
"""

from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "FilePlan",
    "LazyHFCheckpoint",
    "ShardedSafetensorsWriter",
    "SourceLayout",
    "buffer_address",
    "mapped_tensor",
    "parse_size",
    "sized_plan",
    "write_bytes",
]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
DEFAULT_MAX_SHARD_SIZE = "5GB"
"""Largest file of an export that does not reproduce its source's files (transformers' ``save_pretrained`` default)."""

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"150KB"`` / an int of bytes -> bytes (decimal units, as transformers uses).

    Raises:
        ValueError: for text that is not a size, or a size below one byte.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper()) if isinstance(size, str) else None
    if isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    elif match:
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[match.group(2) or "B"]
        nbytes = int(float(match.group(1)) * scale)
    else:
        raise ValueError(f"cannot parse a size from {size!r}; use e.g. '5GB', '500MB' or a byte count")
    if nbytes < 1:
        raise ValueError(f"a size must be at least one byte, got {size!r}")
    return nbytes


def _read_safetensors_header(path: Path) -> tuple[dict, str]:
    """Parse a safetensors header (returned with its raw text) and check the file holds every byte it declares."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file is shorter than a safetensors header")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > size - 8:
                raise ValueError(f"header claims {header_len} bytes but the file has {size - 8}")
            raw = f.read(header_len).decode()
            header = json.loads(raw)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable safetensors file {path}: {exc}") from exc
    header.pop("__metadata__", None)
    data_len = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + header_len + data_len > size:
        raise ValueError(f"truncated safetensors file {path}: tensors need {8 + header_len + data_len} bytes, "
                         f"the file has {size}")
    return header, raw


def mapped_tensor(path: str | os.PathLike, start: int, dtype: torch.dtype, shape: tuple[int, ...]
                  ) -> torch.Tensor | None:
    """The tensor stored at byte ``start`` of ``path``, mapped copy-on-write from the file (no copy, no fresh memory:
    its pages are the page cache's until written, and a write stays private to this process).

    Reading a checkpoint this way instead of into a new tensor saves a memory pass and the kernel's work of
    handing out fresh pages (most of a conversion's system time). The mapping covers only this tensor and goes
    away with the tensor, so memory holds the tensors in use, not the file. None when the bytes are not aligned
    for ``dtype`` (a view needs it) or the tensor is empty: read it instead.
    """
    nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
    page_start = start - start % mmap.ALLOCATIONGRANULARITY
    if not nbytes or (start - page_start) % dtype.itemsize:
        return None
    with open(path, "rb") as f:
        window = mmap.mmap(f.fileno(), start + nbytes - page_start, offset=page_start, access=mmap.ACCESS_COPY)
    data = torch.frombuffer(window, dtype=torch.uint8, offset=start - page_start, count=nbytes)
    _remember_mapping(window, data.data_ptr(), nbytes, str(path), start)
    return data.view(dtype).view(shape)


# Where the bytes of the live mapped tensors come from: start address -> (bytes, file, offset in the file, token).
# An entry goes when its mapping is unmapped (the last tensor on it is gone), so an address is never stale. The
# token matters: CPython unmaps with the GIL released, so another thread can map (and register) the same address
# before the old mapping's finalizer runs; that finalizer must not remove the new entry.
_MAPPINGS: dict[int, tuple[int, str, int, int]] = {}
_MAPPINGS_LOCK = threading.Lock()
_TOKENS = itertools.count()
_KERNEL_COPY_MIN = 64 << 10
"""Smaller writes go through ``write``: an in-kernel copy costs a flush, an open and a lookup (tens of us), and
the offline export's smallest row blocks (a key or value projection's rows of one query group) are 256 KiB at
the Llama-3.2-1B shape."""


def _remember_mapping(window: mmap.mmap, address: int, nbytes: int, path: str, offset: int) -> None:
    token = next(_TOKENS)
    with _MAPPINGS_LOCK:
        _MAPPINGS[address] = (nbytes, path, offset, token)
    weakref.finalize(window, _forget_mapping, address, token)


def _forget_mapping(address: int, token: int) -> None:
    with _MAPPINGS_LOCK:
        if _MAPPINGS.get(address, (0, "", 0, -1))[3] == token:
            del _MAPPINGS[address]


def _file_region(address: int, nbytes: int) -> tuple[str, int] | None:
    """``(file, offset)`` holding the ``nbytes`` at ``address`` when they lie inside one live mapped tensor."""
    with _MAPPINGS_LOCK:
        for start, (size, path, offset, _) in _MAPPINGS.items():
            if start <= address and address + nbytes <= start + size:
                return path, offset + address - start
    return None


def buffer_address(view: memoryview) -> int:
    """The memory address of a byte buffer's first byte."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def write_bytes(file, data) -> int:
    """Write ``data`` (any buffer) at ``file``'s position (an open, seekable binary file) and return its size.

    When the bytes are those of a tensor mapped from a file (:func:`mapped_tensor`), the kernel copies them file
    to file (``copy_file_range``, what ``cp`` uses) instead of ``write`` copying them from memory: on the 2-core dev
    VM a 2.3 GiB checkpoint took ~1.3 s that way and 0.7-6 s through ``write`` (the kernel's copy into fresh
    page-cache pages), most of a conversion's time. Anything else, and where the file systems cannot copy, is
    written as usual.
    """
    view = memoryview(data).cast("B")
    region = None
    if view.nbytes >= _KERNEL_COPY_MIN and hasattr(os, "copy_file_range"):
        region = _file_region(buffer_address(view), view.nbytes)
    if region is None:
        return file.write(view)
    file.flush()
    position = file.tell()
    copied = 0
    with open(region[0], "rb") as source:
        while copied < view.nbytes:
            try:
                n = os.copy_file_range(source.fileno(), file.fileno(), view.nbytes - copied, region[1] + copied,
                                       position + copied)
            except OSError as exc:
                if copied or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                return file.write(view)  # nothing copied yet: this file system pair cannot, write instead
            if n == 0:
                raise OSError(errno.EIO, f"{region[0]} ended while copying {view.nbytes} bytes from offset "
                              f"{region[1]}")
            copied += n
    file.seek(position + copied)
    return copied


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
        self._headers: dict[str, dict] = {}
        self._header_len: dict[str, int] = {}
        self.raw_headers: dict[str, str] = {}
        self._bin_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.format, self.weight_map, self.index_metadata = self._discover()
        for file in sorted(set(self.weight_map.values())):
            if not (self.path / file).exists():
                raise FileNotFoundError(f"{self.path / file} is listed in the checkpoint index but missing")
            if self.format == "safetensors":
                self._headers[file], self.raw_headers[file] = _read_safetensors_header(self.path / file)
                self._header_len[file] = len(self.raw_headers[file].encode())
        if self.format == "safetensors":
            for name, file in self.weight_map.items():
                if name not in self._headers[file]:
                    raise ValueError(f"{self.path / file} does not contain {name!r}, which the index places there")

    def _discover(self) -> tuple[str, dict[str, str], dict]:
        """The weight files in transformers' order of preference: ``model.safetensors``, the safetensors index,
        ``pytorch_model.bin``, the ``.bin`` index (a stale index beside a single file is ignored, as transformers
        ignores it: ``save_pretrained`` of a smaller model into a sharded directory leaves one)."""
        self.index_file: Path | None = None
        for name, fmt, is_index in ((SAFE_SINGLE, "safetensors", False), (SAFE_INDEX, "safetensors", True),
                                    (BIN_SINGLE, "bin", False), (BIN_INDEX, "bin", True)):
            path = self.path / name
            if not path.exists():
                continue
            if not is_index:
                names = _read_safetensors_header(path)[0] if fmt == "safetensors" else self._load_bin(name, path)
                return fmt, {n: name for n in names}, {}
            try:
                data = json.loads(path.read_text())
                weight_map, metadata = dict(data["weight_map"]), dict(data.get("metadata", {}))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"unreadable checkpoint index {path}: {exc}") from exc
            self.index_file = path
            return fmt, weight_map, metadata
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

    def float_dtypes(self, skip=lambda name: False) -> set[torch.dtype]:
        """The stored dtypes of the floating-point tensors, but those whose name ``skip`` is true for."""
        dtypes = (self.dtype_of(name) for name in self.keys() if not skip(name))
        return {d for d in dtypes if d.is_floating_point}

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
        info = self._headers[file][name]
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        if end > begin:
            # Read straight into the tensor's memory: no mmap pages stay resident and no intermediate copy.
            target = tensor.view(-1).view(torch.uint8).numpy()
            try:
                with open(self.path / file, "rb") as f:
                    f.seek(8 + self._header_len[file] + begin)
                    if f.readinto(memoryview(target)) != end - begin:
                        raise ValueError("short read")
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read {name!r} from {self.path / file}: {exc}") from exc
        return tensor

    def get_mapped(self, name: str) -> torch.Tensor:
        """Like :meth:`get`, but a safetensors tensor is mapped copy-on-write from its file (see
        :func:`mapped_tensor`) rather than read: for conversions that only read each tensor and write it on."""
        if name not in self.weight_map or self.format != "safetensors":
            return self.get(name)
        file = self.weight_map[name]
        info = self._headers[file][name]
        try:
            tensor = mapped_tensor(self.path / file, 8 + self._header_len[file] + info["data_offsets"][0],
                                   _DTYPES[info["dtype"]], tuple(info["shape"]))
        except OSError:  # a file system that cannot map files: read it (which names the file if that fails too)
            tensor = None
        return self.get(name) if tensor is None else tensor

    def close(self) -> None:
        self._bin_cache.clear()


_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class FilePlan:
    """One safetensors file to write: its header bytes (length prefix included) and where each tensor goes."""

    name: str
    header: bytes
    entries: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]]
    """tensor name -> (absolute start, end, dtype, shape) in the file."""

    @property
    def size(self) -> int:
        return max((end for _, end, _, _ in self.entries.values()), default=len(self.header))

    @classmethod
    def from_header(cls, name: str, header_json: str) -> FilePlan:
        """Plan a file with exactly this header (so equal tensors give a byte-identical file)."""
        raw = header_json.encode()
        prefix = len(raw).to_bytes(8, "little") + raw
        entries = {}
        for tensor, info in json.loads(header_json).items():
            if tensor == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            entries[tensor] = (len(prefix) + begin, len(prefix) + end, _DTYPES[info["dtype"]], tuple(info["shape"]))
        return cls(name, prefix, entries)

    @classmethod
    def build(cls, name: str, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
              metadata: dict[str, str]) -> FilePlan:
        """Lay tensors out as safetensors does: larger elements first (keeps data aligned), then by name."""
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for tensor, dtype, shape in sorted(tensors, key=lambda t: (-t[1].itemsize, t[0])):
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            header[tensor] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"))
        text += " " * (-(len(text) + 8) % 8)  # data starts 8-byte aligned, as safetensors writes it
        return cls.from_header(name, text)


@dataclass(frozen=True)
class SourceLayout:
    """A source checkpoint's safetensors headers (hence files, dtypes, shapes and byte layout) and its index."""

    headers: dict[str, str]
    """file name -> raw JSON header of that file."""
    index_text: str | None
    """the raw ``model.safetensors.index.json``, or None for a single-file checkpoint."""

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> SourceLayout | None:
        """The layout of a safetensors checkpoint directory; None for .bin checkpoints or no weights."""
        try:
            reader = LazyHFCheckpoint(path)
        except (FileNotFoundError, ValueError):
            return None
        if reader.format != "safetensors":
            return None
        return cls(dict(reader.raw_headers), reader.index_file.read_text() if reader.index_file else None)

    def plans(self) -> list[FilePlan]:
        return [FilePlan.from_header(name, text) for name, text in sorted(self.headers.items())]

    @property
    def weight_map(self) -> dict[str, str]:
        return {t: plan.name for plan in self.plans() for t in plan.entries}

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {t: e[2] for plan in self.plans() for t, e in plan.entries.items()}

    def to_json(self) -> dict:
        return {"headers": self.headers, "index_text": self.index_text}

    @classmethod
    def from_json(cls, data: dict) -> SourceLayout:
        return cls(dict(data["headers"]), data.get("index_text"))


def sized_plan(shapes: list[tuple[str, tuple[int, ...]]], dtypes: dict[str, torch.dtype],
               aliases: dict[str, list[str]]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of each tensor, each followed by its tied aliases, for
    :meth:`ShardedSafetensorsWriter.by_size`: the tensors before the first layer, then layer by layer, then the
    rest, by name within each, so that every export path (the model's order, the checkpoint's) cuts the same files."""
    layers = [int(m.group(1)) if (m := re.search(r"\.layers\.(\d+)\.", name)) else None for name, _ in shapes]
    first = next((i for i, layer in enumerate(layers) if layer is not None), len(shapes))

    def key(i: int) -> tuple:
        group = (1, layers[i]) if layers[i] is not None else (0 if i < first else 2, 0)
        return group, shapes[i][0]

    return [(name, dtypes[name], shapes[i][1]) for i in sorted(range(len(shapes)), key=key)
            for name in (shapes[i][0], *aliases.get(shapes[i][0], ()))]


class ShardedSafetensorsWriter:
    """Write tensors, in any order, straight to their place in pre-planned safetensors files.

    Every file's header is written first, so each arriving tensor is written at its final offset and then
    dropped: memory holds one tensor at a time, not a shard. From a :class:`SourceLayout` the headers are the
    source's own, so equal tensors reproduce the source files byte for byte (and its index verbatim).

    Args:
        out_dir: the (already existing, normally temporary) directory to write into.
        plans: the files to write.
        index_text: the ``model.safetensors.index.json`` to write, or None for none.
    """

    def __init__(self, out_dir: str | os.PathLike, plans: list[FilePlan], index_text: str | None) -> None:
        self.out_dir = Path(out_dir)
        self.plans = {p.name: p for p in plans}
        self.index_text = index_text
        self._where = {t: p.name for p in plans for t in p.entries}
        self._remaining = {p.name: set(p.entries) for p in plans}
        self._handles: dict[str, object] = {}

    @classmethod
    def from_source(cls, out_dir: str | os.PathLike, layout: SourceLayout) -> ShardedSafetensorsWriter:
        return cls(out_dir, layout.plans(), layout.index_text)

    @classmethod
    def by_size(cls, out_dir: str | os.PathLike, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], *,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, metadata: dict[str, str] | None = None
                ) -> ShardedSafetensorsWriter:
        """Fill files in the given order up to ``max_shard_size`` each, named as ``save_pretrained`` names them."""
        limit = parse_size(max_shard_size)
        groups: list[list] = [[]]
        size = 0
        for name, dtype, shape in tensors:
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            if groups[-1] and size + nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, shape))
            size += nbytes
        metadata = metadata or {"format": "pt"}
        if len(groups) == 1:
            return cls(out_dir, [FilePlan.build(SAFE_SINGLE, groups[0], metadata)], None)
        plans = [FilePlan.build(f"model-{i:05d}-of-{len(groups):05d}.safetensors", g, metadata)
                 for i, g in enumerate(groups, start=1)]
        total = sum(plan.size - len(plan.header) for plan in plans)
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: p.name for p in plans for t in sorted(p.entries)}}
        return cls(out_dir, plans, json.dumps(index, indent=2, sort_keys=True) + "\n")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._write(name, [tensor], tensor.dtype, tuple(tensor.shape))

    def add_rows(self, name: str, parts: list[torch.Tensor]) -> None:
        """Write tensor ``name`` given as row blocks: tensors whose concatenation along dim 0 is it, never built.

        Each block goes out by :func:`write_bytes`, so a block that is a row range of a tensor mapped from a
        file (the offline export's Q / K / V rows, gate / up halves) is copied file to file by the kernel.
        """
        if len(parts) == 1:
            self.add(name, parts[0])
            return
        if not parts:
            raise ValueError(f"tensor {name!r}: no row blocks given")
        dtypes = {p.dtype for p in parts}
        tails = {tuple(p.shape[1:]) for p in parts}
        if len(dtypes) > 1 or len(tails) > 1 or any(p.dim() == 0 for p in parts):
            raise ValueError(f"tensor {name!r}: row blocks of different dtypes or trailing shapes "
                             f"{[f'{p.dtype}{tuple(p.shape)}' for p in parts]}")
        shape = (sum(p.shape[0] for p in parts), *tails.pop())
        self._write(name, parts, dtypes.pop(), shape)

    def _write(self, name: str, parts: list[torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        file = self._where.get(name)
        if file is None:
            raise ValueError(f"tensor {name!r} has no place in the planned checkpoint layout")
        if name not in self._remaining[file]:
            raise ValueError(f"tensor {name!r} was written twice")
        start, end, planned_dtype, planned_shape = self.plans[file].entries[name]
        if dtype != planned_dtype or shape != planned_shape:
            raise ValueError(f"tensor {name!r} is {dtype}{shape}, the layout expects {planned_dtype}{planned_shape}")
        handle = self._handles.get(file)
        if handle is None:
            handle = open(self.out_dir / file, "wb")  # noqa: SIM115 (kept open until the file is complete)
            handle.write(self.plans[file].header)
            self._handles[file] = handle
        handle.seek(start)
        for part in parts:
            write_bytes(handle, memoryview(part.detach().to("cpu").contiguous().view(torch.uint8).numpy()))
        self._remaining[file].discard(name)
        if not self._remaining[file]:
            handle.truncate(self.plans[file].size)
            handle.close()
            del self._handles[file]

    def close(self) -> dict[str, str]:
        """Check completeness and write the index; returns the weight map.

        Raises:
            ValueError: if some planned tensors never arrived (they are named).
        """
        missing = sorted(n for names in self._remaining.values() for n in names)
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        if missing:
            raise ValueError(f"export is missing {len(missing)} tensors of the planned layout: {missing[:20]}")
        if self.index_text is not None:
            (self.out_dir / SAFE_INDEX).write_text(self.index_text)
        return dict(self._where)
