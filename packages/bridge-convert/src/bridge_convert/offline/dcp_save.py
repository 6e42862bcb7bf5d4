"""The ``.metadata`` of a torch_dist checkpoint whose data files are already written, made by DCP's own save.

:func:`~bridge_convert.offline.dist_ckpt.write_dist_checkpoint` writes the data files first, while
``torch.distributed.checkpoint`` (1.4-4 s to import) is imported in the background; this module, imported only
then, runs DCP's ``save`` with a planner that plans those chunks and objects and a file-system writer that reports
where they were written instead of writing them. So the metadata is DCP's own: the global plan, the chunk and
storage records and the storage metadata are made by DCP's code, as for any save.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from .dist_ckpt import DATA_FILE_PREFIX, ChunkSpec, ObjectSpec, StoredItem

__all__ = ["save_metadata"]


def _properties(chunk: ChunkSpec) -> TensorProperties:
    """As megatron-core records them: strides only for a tensor saved whole, none for one saved in chunks."""
    properties = TensorProperties.create_from_tensor(torch.empty(chunk.global_shape, dtype=chunk.dtype, device="meta"))
    if tuple(chunk.sizes) != tuple(chunk.global_shape):
        properties.strides = None
    return properties


class _PlanningOnly(SavePlanner):
    """A save planner over chunk and object specs whose data is already in the data files."""

    def __init__(self, chunks: list[ChunkSpec], objects: list[ObjectSpec]):
        self._chunks, self._objects = chunks, objects

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self._storage_meta = storage_meta

    def create_local_plan(self) -> SavePlan:
        items = []
        for chunk in self._chunks:
            items.append(WriteItem(
                index=MetadataIndex(chunk.key, torch.Size(chunk.offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes)),
                    properties=_properties(chunk), size=torch.Size(chunk.global_shape))))
        for obj in self._objects:
            items.append(WriteItem(index=MetadataIndex(obj.unique_key), type=WriteItemType.BYTE_IO,
                                   bytes_io_data=BytesIOWriteData(nbytes=0)))
        return SavePlan(items)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

        plans, metadata = create_default_global_save_plan(all_plans)
        metadata.storage_meta = self._storage_meta
        return plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        raise RuntimeError("the data files are written before the metadata; nothing is resolved here")


class _WrittenFiles(FileSystemWriter):
    """DCP's file-system writer (plan preparation, ``.metadata`` written by ``finish``) over data files that are
    already written: ``write_data`` reports where each planned item is."""

    def __init__(self, path: str, stored: dict[tuple, StoredItem]):
        super().__init__(path, single_file_per_rank=True, sync_files=False)
        self._stored = stored

    def write_data(self, plan: SavePlan, planner: SavePlanner):
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.storage import WriteResult

        if plan.storage_data.prefix != DATA_FILE_PREFIX:
            raise RuntimeError(f"DCP named the data files {plan.storage_data.prefix}*, they were written as "
                               f"{DATA_FILE_PREFIX}*")
        results = []
        for item in plan.items:
            shard = item.type != WriteItemType.BYTE_IO
            where = self._stored[(item.index.fqn, tuple(item.index.offset) if shard else None)]
            results.append(WriteResult(index=item.index, size_in_bytes=where.size,
                                       storage_data=_StorageInfo(where.file, where.offset, where.length)))
        done = torch.futures.Future()
        done.set_result(results)
        return done


def save_metadata(directory: str | os.PathLike, chunks: list[ChunkSpec], objects: list[ObjectSpec],
                  stored: dict[tuple, StoredItem]) -> None:
    """Write ``directory/.metadata`` through DCP's save for chunks and objects stored where ``stored`` says."""
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process():
            save({}, storage_writer=_WrittenFiles(str(directory), stored), planner=_PlanningOnly(chunks, objects),
                 no_dist=True)
    except CheckpointException as exc:
        raise _original(exc) from exc


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
