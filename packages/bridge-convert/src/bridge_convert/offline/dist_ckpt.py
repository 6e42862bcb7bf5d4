"""megatron-core's ``torch_dist`` checkpoint format, written and read piece by piece without megatron-core.

A ``torch_dist`` checkpoint is a ``torch.distributed.checkpoint`` (DCP) directory (``.metadata`` plus
``__*_*.distcp`` data files) and megatron-core's ``metadata.json`` naming the backend. megatron-core saves every
``ShardedTensor`` as DCP chunks of one global tensor (per-layer weights stacked on a prepended layer axis) and
every ``ShardedObject`` as a byte item keyed ``<key>/shard_<offset>_<shape>`` holding ``torch.save([data])``; its
common (non-sharded) state is the object ``common_state/shard_0_1``.

Writing lays the data files out as DCP's file-system writer does, producing each chunk when its turn comes and
dropping it once written, so memory holds one chunk per writer thread, never the model; DCP's own save then writes
the ``.metadata`` of those files (:mod:`.dcp_save`). Reading takes one region (a layer slice) at a time from DCP's
metadata: each stored chunk is a ``torch.save`` archive inside a data file, mapped into its tensor; a region
stored in several chunks (a gated-MLP weight, a checkpoint saved at TP > 1) is assembled from them. So a checkpoint written at any TP / PP layout, by training or
by this module, is read the same way.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import threading
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..safetensors_io import buffer_address, mapped_tensor, write_bytes
from .dcp_metadata import StoredTensor, read_metadata

__all__ = ["BACKEND_CONFIG", "ChunkSpec", "DistCheckpointReader", "ObjectSpec", "write_dist_checkpoint"]

BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
"""megatron-core's ``metadata.json`` for a torch_dist checkpoint (``dist_checkpointing.core.CheckpointingConfig``)."""
CONFIG_FILE = "metadata.json"
DATA_FILE_PREFIX = "__0_"
"""The data file names of a single-process save: DCP's file-system writer names rank 0's ``__0_<i>.distcp``."""


@dataclass(frozen=True)
class ChunkSpec:
    """One DCP chunk of a global tensor and the function that produces its data (shape ``sizes``, ``dtype``).

    ``produce`` returns the chunk, or a list of blocks whose bytes one after the other are the chunk's (row ranges
    of the tensors it is made of, as the QKV interleave picks them): the chunk is then never built, and blocks
    mapped from a file reach the data file by an in-kernel copy.
    """

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor | list[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.sizes).numel()) * self.dtype.itemsize


@dataclass(frozen=True)
class ObjectSpec:
    """A megatron-core ``ShardedObject``: stored as ``torch.save([data])`` under ``unique_key``."""

    unique_key: str
    data: object


@dataclass(frozen=True)
class StoredItem:
    """Where a chunk or object was written: data file, byte range, and the size DCP records for it."""

    file: str
    offset: int
    length: int
    size: int


def _produce(chunk: ChunkSpec) -> torch.Tensor | list[torch.Tensor]:
    """The chunk's tensor, or its blocks (each contiguous, of the chunk's dtype, together exactly its elements)."""
    produced = chunk.produce()
    if isinstance(produced, list):
        if len(produced) == 1 and produced[0].numel() == int(torch.Size(chunk.sizes).numel()):
            produced = produced[0].reshape(chunk.sizes)
        else:
            if any(b.dtype != chunk.dtype for b in produced) or \
                    sum(b.numel() for b in produced) != int(torch.Size(chunk.sizes).numel()):
                raise ValueError(f"{chunk.key} at {chunk.offsets}: produced blocks "
                                 f"{[f'{b.dtype}{tuple(b.shape)}' for b in produced]}, the checkpoint layout "
                                 f"expects {chunk.dtype}{tuple(chunk.sizes)}")
            return [b.contiguous() for b in produced]
    tensor = produced
    if tuple(tensor.shape) != tuple(chunk.sizes) or tensor.dtype != chunk.dtype:
        raise ValueError(f"{chunk.key} at {chunk.offsets}: produced {tensor.dtype}{tuple(tensor.shape)}, the "
                         f"checkpoint layout expects {chunk.dtype}{tuple(chunk.sizes)}")
    return _own_storage(tensor.contiguous())


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (contiguous) on a storage of exactly its bytes, sharing its memory: torch.save writes a view's
    whole storage, and a copy would cost a pass over memory."""
    if tensor.untyped_storage().nbytes() == tensor.nbytes or not tensor.numel():
        return tensor
    data = tensor.view(-1).view(torch.uint8).numpy()  # keeps the original storage alive
    return torch.frombuffer(data, dtype=torch.uint8).view(tensor.dtype).view(tensor.shape)


_ITEM_ALIGNMENT = 64


class _KernelCopying:
    """A file for ``torch.save`` whose writes go through :func:`~bridge_convert.safetensors_io.write_bytes`: a
    tensor mapped from the source checkpoint reaches the data file by an in-kernel copy.

    With ``blocks``, ``torch.save`` is given ``stand_in``, an empty tensor of the chunk's shape whose memory is never
    written nor read (no page of it is touched): where ``torch.save`` writes its bytes, the blocks' bytes are written
    instead, so the saved record holds the chunk, never built in memory.
    """

    def __init__(self, file, stand_in: torch.Tensor | None = None, blocks: list[torch.Tensor] = ()) -> None:
        self.file = file
        self._blocks = [b.view(-1).view(torch.uint8) for b in blocks]
        self._start = stand_in.data_ptr() if stand_in is not None else None
        self._nbytes = stand_in.nbytes if stand_in is not None else 0
        self.substituted = 0
        """Bytes of the stand-in that were written as the blocks' bytes (all of them, or the record is wrong)."""

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._start is None or not view.nbytes:
            return write_bytes(self.file, view)
        begin = buffer_address(view) - self._start
        if begin < 0 or begin + view.nbytes > self._nbytes:  # a record of its own (the pickle, the version)
            return write_bytes(self.file, view)
        position = 0
        for block in self._blocks:  # the blocks' bytes over [begin, begin + view.nbytes) of the stand-in
            low, high = max(begin, position), min(begin + view.nbytes, position + block.numel())
            if low < high:
                write_bytes(self.file, block[low - position:high - position].numpy())
            position += block.numel()
        self.substituted += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.file.flush()


def _save_through_stand_in(stream, spec: ChunkSpec, blocks: list[torch.Tensor]) -> bool:
    """``torch.save`` of the chunk made of ``blocks`` without building it (see :class:`_KernelCopying`); False when
    the record is not right and must be written again from the built chunk: with the CRC-32 on (it would be the
    stand-in's), or when ``torch.save`` did not write the stand-in from its own memory (a torch that copies
    storages first would have written uninitialised bytes)."""
    if _crc32_on():
        return False
    stand_in = torch.empty(spec.sizes, dtype=spec.dtype)
    writer = _KernelCopying(stream, stand_in, blocks)
    torch.save(stand_in, writer)
    return writer.substituted == spec.nbytes


@contextmanager
def _without_crc32():
    """torch.save without the zip CRC-32 of each record: it costs more than the rest of the write (12x on a CPU)
    and nothing checks it (``torch.load``, hence DCP and megatron-core, reads the records without it). torch's
    serialization config is per thread: enter this in the thread that saves."""
    from torch.utils.serialization import config

    previous = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = previous


def _crc32_on() -> bool:
    from torch.utils.serialization import config

    return bool(config.save.compute_crc32)


def _write_data_files(directory: Path, chunks: list[ChunkSpec], objects: list[ObjectSpec], threads: int,
                      on_chunk: Callable[[ChunkSpec], None]) -> dict[tuple, StoredItem]:
    """Write the data files as DCP's file-system writer lays them out (``torch.save`` of each chunk, the
    ``torch.save([data])`` bytes of each object, items dealt in order to the least-filled of ``threads`` files),
    producing each chunk when its turn comes and dropping it once written.

    Returns:
        where each item went, keyed ``(tensor key, offsets)`` for chunks and ``(unique key, None)`` for objects.
    """
    from concurrent.futures import ThreadPoolExecutor

    items = [(c.key, tuple(c.offsets), c) for c in chunks] + [(o.unique_key, None, o) for o in objects]
    if len({(key, offsets) for key, offsets, _ in items}) != len(items):
        raise ValueError("two chunks of the same tensor start at the same offset, or two objects share a key")
    buckets: list[list] = [[] for _ in range(threads)]
    sizes = [0] * threads
    for item in items:
        i = sizes.index(min(sizes))
        buckets[i].append(item)
        sizes[i] += item[2].nbytes if item[1] is not None else 0

    def write(index: int, bucket: list) -> dict[tuple, StoredItem]:
        name = f"{DATA_FILE_PREFIX}{index}.distcp"
        stored = {}
        with _without_crc32(), open(directory / name, "wb") as stream:
            for key, offsets, spec in bucket:
                # Each item starts on a 64-byte boundary (readers go by the offsets in .metadata, so the gap is
                # never read): its tensor bytes are then aligned for their dtype, and an export maps them from the
                # file instead of reading them into fresh memory.
                stream.write(bytes(-stream.tell() % _ITEM_ALIGNMENT))
                start = stream.tell()
                if offsets is None:
                    buffer = io.BytesIO()
                    torch.save([spec.data], buffer)
                    stream.write(buffer.getbuffer())
                    size = stream.tell() - start
                else:
                    tensor = _produce(spec)
                    on_chunk(spec)
                    if not (isinstance(tensor, list) and _save_through_stand_in(stream, spec, tensor)):
                        if isinstance(tensor, list):  # the chunk is built after all (see _save_through_stand_in)
                            stream.seek(start)
                            stream.truncate()
                            tensor = torch.cat([b.reshape(-1) for b in tensor]).view(spec.sizes)
                        torch.save(tensor, _KernelCopying(stream))
                    size = spec.nbytes
                    del tensor
                stored[(key, offsets)] = StoredItem(name, start, stream.tell() - start, size)
        return stored

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(write, i, bucket) for i, bucket in enumerate(buckets) if bucket]
        return {k: v for f in futures for k, v in f.result().items()}


def _import_in_background(module: str) -> Callable[[], None]:
    """Start importing ``module`` in a thread; the returned function waits for it (and raises what it raised)."""
    if module in sys.modules:
        return lambda: None
    failure: list[BaseException] = []

    def run() -> None:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"import {module}", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return wait


def write_dist_checkpoint(directory: str | os.PathLike, chunks: list[ChunkSpec], objects: list[ObjectSpec], *,
                          threads: int = 2, on_chunk: Callable[[ChunkSpec], None] = lambda chunk: None) -> None:
    """Write a torch_dist checkpoint into the existing, empty ``directory`` (no process group needed).

    The data files are written first; then the ``.metadata`` of what was written: by :mod:`.dcp_write` (the same
    pickle, without importing ``torch.distributed.checkpoint``) on the torch versions it was checked against, else
    by DCP's own save (:mod:`bridge_convert.offline.dcp_save`; DCP is imported in the background meanwhile, ~1 s
    of CPU). Files are not fsynced (as the safetensors writer): the staged
    directory is renamed into place only when complete, which is what protects against a killed run.

    Args:
        directory: the (staging) checkpoint directory.
        chunks: every tensor chunk, each produced on demand from its ``produce`` (called once, from a writer
            thread).
        objects: the sharded objects (including megatron-core's ``common_state``).
        threads: writer threads (one data file each).
        on_chunk: called after each chunk is produced (progress).
    """
    from .dcp_write import can_write_metadata, write_metadata

    fast = can_write_metadata()  # the same file without importing DCP (a verified torch)
    wait_for_dcp = (lambda: None) if fast else _import_in_background("torch.distributed.checkpoint")
    stored = _write_data_files(Path(directory), chunks, objects, max(1, threads), on_chunk)
    if not (fast and write_metadata(directory, chunks, objects, stored)):
        wait_for_dcp()
        from .dcp_save import save_metadata

        save_metadata(directory, chunks, objects, stored)
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(BACKEND_CONFIG))


class _Slice(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of a file, as a seekable file of its own."""

    def __init__(self, f, start: int, length: int) -> None:
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._length + pos}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def _read_saved_tensor(f, start: int, length: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of a ``torch.save`` archive at ``[start, start + length)`` of ``f``.

    torch.save stores a tensor's bytes uncompressed as the archive's ``data/0`` record; the result maps them
    copy-on-write from the file (:func:`~bridge_convert.safetensors_io.mapped_tensor`), or, unaligned, reads them
    straight into itself. Anything else (several storages, a compressed record) goes through ``torch.load``.
    """
    window = _Slice(f, start, length)
    with zipfile.ZipFile(window) as archive:
        records = [i for i in archive.infolist() if i.filename.split("/", 1)[-1].startswith("data/")]
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        if len(records) == 1 and records[0].compress_type == zipfile.ZIP_STORED and records[0].file_size == nbytes:
            info = records[0]
            window.seek(info.header_offset)
            header = window.read(30)
            if header[:4] != b"PK\x03\x04":
                raise ValueError("bad local header in a saved tensor")
            data_start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
                int.from_bytes(header[28:30], "little")
            mapped = None
            if start + data_start + nbytes <= os.fstat(f.fileno()).st_size:  # a mapping past the end faults
                try:
                    mapped = mapped_tensor(f.name, start + data_start, dtype, shape)
                except OSError:  # a file system that cannot map files: read instead
                    mapped = None
            if mapped is not None:
                return mapped
            tensor = torch.empty(shape, dtype=dtype)
            window.seek(data_start)
            if nbytes and window.readinto(tensor.view(-1).view(torch.uint8).numpy()) != nbytes:
                raise ValueError("short read")
            return tensor
    window.seek(0)
    return torch.load(io.BufferedReader(window), map_location="cpu", weights_only=True).reshape(shape)


def assemble_region(pieces: list[tuple[tuple[int, ...], torch.Tensor]], shape: tuple[int, ...],
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The region of ``shape`` made of ``pieces`` (from :meth:`DistCheckpointReader.region_pieces`): the piece
    itself when it is the whole region, else the pieces copied into ``out`` (or a new tensor)."""
    if len(pieces) == 1 and tuple(pieces[0][1].shape) == tuple(shape):
        return pieces[0][1]
    dtype = pieces[0][1].dtype
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"a buffer {out.dtype}{tuple(out.shape)} for a region {dtype}{tuple(shape)}")
    for dest_offsets, piece in pieces:
        target = out
        for dim, (start, length) in enumerate(zip(dest_offsets, piece.shape)):
            target = target.narrow(dim, start, length)
        target.copy_(piece)
    return out


class DistCheckpointReader:
    """Read regions of a torch_dist checkpoint's tensors, whatever layout wrote them.

    Raises:
        ValueError: for a directory that is not a readable torch_dist checkpoint (the file is named).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        config = self.directory / CONFIG_FILE
        try:
            backend = json.loads(config.read_text()).get("sharded_backend")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{config} is missing or unreadable ({exc}); not a megatron-core dist checkpoint") from exc
        if backend != "torch_dist":
            raise ValueError(f"{config} names the {backend!r} backend; only torch_dist checkpoints are supported")
        try:
            self.metadata = read_metadata(self.directory)
        except Exception as exc:
            raise ValueError(f"unreadable checkpoint metadata {self.directory / '.metadata'}: "
                             f"{type(exc).__name__}: {exc}") from exc
        self._check_data_files()

    def _check_data_files(self) -> None:
        """Every data file the metadata points into exists and is long enough (a truncated copy is named)."""
        needed: dict[str, int] = {}
        for info in self.metadata.storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in needed.items():
            path = self.directory / name
            if not path.exists():
                raise ValueError(f"checkpoint data file {path} is missing")
            if path.stat().st_size < size:
                raise ValueError(f"truncated checkpoint data file {path}: the metadata needs {size} bytes, the file "
                                 f"has {path.stat().st_size}")

    def tensor_keys(self) -> dict[str, StoredTensor]:
        return dict(self.metadata.tensors)

    def object_keys(self) -> list[str]:
        return list(self.metadata.objects)

    def read_region(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...],
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored tensor ``key`` from ``offsets`` on, of ``shape``, whatever chunks wrote it.

        A region that is one stored chunk (every checkpoint megatron-core writes at TP=1 stores one chunk per
        layer slice) is mapped from the data file: memory holds it once. A region of several chunks (a gated-MLP
        weight's two halves, a TP > 1 save) is assembled into ``out`` when given (a buffer the caller reuses
        from layer to layer, so its pages are not fresh each time), else into a new tensor.
        """
        return assemble_region(self.region_pieces(key, offsets, shape), shape, out=out)

    def region_pieces(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]
                      ) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """The stored chunks' parts that make up a region, unassembled: ``(offsets in the region, tensor)`` each,
        every tensor mapped from its data file where the file allows (see :meth:`read_region`)."""
        stored = self.metadata.tensors.get(key)
        if stored is None:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.directory}")
        end = [o + s for o, s in zip(offsets, shape)]
        if len(end) != len(stored.size) or any(e > s for e, s in zip(end, stored.size)):
            raise ValueError(f"{key}: region {tuple(offsets)}+{tuple(shape)} lies outside the stored shape "
                             f"{tuple(stored.size)} in {self.directory}")
        pieces = []
        for chunk_offsets, chunk_sizes in stored.chunks:
            low = [max(o, c) for o, c in zip(offsets, chunk_offsets)]
            high = [min(e, c + n) for e, c, n in zip(end, chunk_offsets, chunk_sizes)]
            if any(lo >= hi for lo, hi in zip(low, high)):
                continue  # this chunk lies outside the region
            piece = self._load_chunk(key, chunk_offsets, chunk_sizes, stored.dtype)
            for dim, (lo, hi, start) in enumerate(zip(low, high, chunk_offsets)):
                piece = piece.narrow(dim, lo - start, hi - lo)
            pieces.append((tuple(lo - o for lo, o in zip(low, offsets)), piece))
        if not pieces:
            raise ValueError(f"{key}: no stored chunk covers {tuple(offsets)}+{tuple(shape)} in {self.directory}")
        return pieces

    def _load_chunk(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor:
        """One stored chunk (a ``torch.save`` archive inside a data file), read without an intermediate copy."""
        info = self.metadata.storage.get((key, tuple(offsets)))
        if info is None:
            raise ValueError(f"checkpoint {self.directory}: the metadata lists a chunk of {key!r} at {offsets} but "
                             "not where it is stored")
        path = self.directory / info.relative_path
        if info.transform_descriptors:
            raise ValueError(f"{path}: chunks stored with transforms {info.transform_descriptors} are not supported")
        try:
            with open(path, "rb") as f:
                return _read_saved_tensor(f, info.offset, info.length, dtype, tuple(sizes))
        except (OSError, ValueError, RuntimeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"cannot read {key!r} from the checkpoint data file {path}: "
                             f"{type(exc).__name__}: {exc}") from exc
