"""megatron-core's ``torch_dist`` checkpoint format, written and read piece by piece without megatron-core.

A ``torch_dist`` checkpoint is a ``torch.distributed.checkpoint`` (DCP) directory (``.metadata`` plus
``__*_*.distcp`` data files) and megatron-core's ``metadata.json`` naming the backend. megatron-core saves every
``ShardedTensor`` as DCP chunks of one global tensor (per-layer weights stacked on a prepended layer axis) and
every ``ShardedObject`` as a byte item keyed ``<key>/shard_<offset>_<shape>`` holding ``torch.save([data])``; its
common (non-sharded) state is the object ``common_state/shard_0_1``.

Writing goes through DCP's own planner protocol and ``FileSystemWriter`` with a planner whose ``resolve_data``
produces each chunk on demand, so memory holds one chunk per writer thread, never the model. Reading asks DCP
for one region (a layer slice) at a time through a load planner that copies into a caller-provided tensor, so a
checkpoint written at any TP / PP layout (by training, or by this module) is read the same way.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

__all__ = ["BACKEND_CONFIG", "ChunkSpec", "DistCheckpointReader", "ObjectSpec", "write_dist_checkpoint"]

BACKEND_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
"""megatron-core's ``metadata.json`` for a torch_dist checkpoint (``dist_checkpointing.core.CheckpointingConfig``)."""
CONFIG_FILE = "metadata.json"


@dataclass(frozen=True)
class ChunkSpec:
    """One DCP chunk of a global tensor and the function that produces its data (shape ``sizes``, ``dtype``)."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.sizes).numel()) * self.dtype.itemsize


@dataclass(frozen=True)
class ObjectSpec:
    """A megatron-core ``ShardedObject``: stored as ``torch.save([data])`` under ``unique_key``."""

    unique_key: str
    data: object


def _properties(chunk: ChunkSpec) -> TensorProperties:
    """As megatron-core records them: strides only for a tensor saved whole, none for one saved in chunks."""
    properties = TensorProperties.create_from_tensor(torch.empty(chunk.global_shape, dtype=chunk.dtype, device="meta"))
    if tuple(chunk.sizes) != tuple(chunk.global_shape):
        properties.strides = None
    return properties


class _LazySavePlanner(SavePlanner):
    """A save planner over chunk specs: the plan comes from the specs, the data from ``produce`` when written."""

    def __init__(self, chunks: list[ChunkSpec], objects: list[ObjectSpec], on_chunk: Callable[[ChunkSpec], None]):
        self._chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        if len(self._chunks) != len(chunks):
            raise ValueError("two chunks of the same tensor start at the same offset")
        self._objects = {o.unique_key: o for o in objects}
        self._on_chunk = on_chunk

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self._storage_meta = storage_meta

    def create_local_plan(self) -> SavePlan:
        items = []
        for chunk in self._chunks.values():
            items.append(WriteItem(
                index=MetadataIndex(chunk.key, torch.Size(chunk.offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes)),
                    properties=_properties(chunk), size=torch.Size(chunk.global_shape))))
        for key in self._objects:
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO,
                                   bytes_io_data=BytesIOWriteData(nbytes=0)))
        return SavePlan(items)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

        plans, metadata = create_default_global_save_plan(all_plans)
        metadata.storage_meta = self._storage_meta
        return plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn].data], buffer)
            return buffer
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = chunk.produce()
        if tuple(tensor.shape) != tuple(chunk.sizes) or tensor.dtype != chunk.dtype:
            raise ValueError(f"{chunk.key} at {chunk.offsets}: produced {tensor.dtype}{tuple(tensor.shape)}, the "
                             f"checkpoint layout expects {chunk.dtype}{tuple(chunk.sizes)}")
        self._on_chunk(chunk)
        return tensor.contiguous()


def write_dist_checkpoint(directory: str | os.PathLike, chunks: list[ChunkSpec], objects: list[ObjectSpec], *,
                          threads: int = 2, on_chunk: Callable[[ChunkSpec], None] = lambda chunk: None) -> None:
    """Write a torch_dist checkpoint into the existing, empty ``directory`` (no process group needed).

    Args:
        directory: the (staging) checkpoint directory.
        chunks: every tensor chunk, each produced on demand from its ``produce`` (called once, from a writer
            thread).
        objects: the sharded objects (including megatron-core's ``common_state``).
        threads: writer threads (one data file each).
        on_chunk: called after each chunk is produced (progress).
    """
    from torch.distributed.checkpoint import save

    planner = _LazySavePlanner(chunks, objects, on_chunk)
    writer = FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=max(1, threads))
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process():
            save({}, storage_writer=writer, planner=planner, no_dist=True)
    except CheckpointException as exc:
        raise _original(exc) from exc
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(BACKEND_CONFIG))


@contextmanager
def _single_process():
    """Without a process group DCP warns that it assumes a single process, which is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _original(exc: Exception) -> BaseException:
    """The exception a DCP step raised, out of the CheckpointException that wraps it per rank."""
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return inner
    return exc


class _SliceLoadPlanner(LoadPlanner):
    """Read requested regions of stored tensors (and whole byte objects) into caller-provided buffers."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]], objects: Iterable[str]) -> None:
        self._regions = regions
        self._objects = list(objects)
        self.loaded_objects: dict[str, object] = {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items: list[ReadItem] = []
        for key, (offsets, buffer) in self._regions.items():
            stored = self.metadata.state_dict_metadata[key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buffer.shape)
            items += create_read_items_for_chunk_list(key, stored, [chunk])
        for key in self._objects:
            index = MetadataIndex(key)
            items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size([0]),
                                  storage_index=index, storage_offsets=torch.Size([0]), lengths=torch.Size([0])))
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        value.seek(0)
        self.loaded_objects[read_item.dest_index.fqn] = torch.load(value, weights_only=True)[0]

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        region = self._regions[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            region = region.narrow(dim, start, length)
        return region

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


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
            self.metadata: Metadata = FileSystemReader(str(self.directory)).read_metadata()
        except Exception as exc:
            raise ValueError(f"unreadable checkpoint metadata {self.directory / '.metadata'}: "
                             f"{type(exc).__name__}: {exc}") from exc
        self._check_data_files()

    def _check_data_files(self) -> None:
        """Every data file the metadata points into exists and is long enough (a truncated copy is named)."""
        needed: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in needed.items():
            path = self.directory / name
            if not path.exists():
                raise ValueError(f"checkpoint data file {path} is missing")
            if path.stat().st_size < size:
                raise ValueError(f"truncated checkpoint data file {path}: the metadata needs {size} bytes, the file "
                                 f"has {path.stat().st_size}")

    def tensor_keys(self) -> dict[str, TensorStorageMetadata]:
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def object_keys(self) -> list[str]:
        return [k for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]

    def read(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]], objects: Iterable[str] = ()
             ) -> dict[str, object]:
        """Fill each buffer with the stored region starting at its offsets; return the requested objects."""
        from torch.distributed.checkpoint import load

        for key, (offsets, buffer) in regions.items():
            stored = self.metadata.state_dict_metadata.get(key)
            if not isinstance(stored, TensorStorageMetadata):
                raise KeyError(f"tensor {key!r} is not in the checkpoint {self.directory}")
            end = [o + s for o, s in zip(offsets, buffer.shape)]
            if len(end) != len(stored.size) or any(e > s for e, s in zip(end, stored.size)):
                raise ValueError(f"{key}: region {tuple(offsets)}+{tuple(buffer.shape)} lies outside the stored "
                                 f"shape {tuple(stored.size)} in {self.directory}")
        planner = _SliceLoadPlanner(regions, objects)
        reader = FileSystemReader(str(self.directory))
        try:
            with _single_process():
                load({}, storage_reader=reader, planner=planner, no_dist=True)
        except Exception as exc:
            exc = _original(exc)
            if isinstance(exc, OSError):
                raise exc
            raise ValueError(f"cannot read {sorted(regions) or list(objects)} from the checkpoint {self.directory}: "
                             f"{type(exc).__name__}: {exc}") from exc
        return planner.loaded_objects
