"""The ``.metadata`` of a torch_dist checkpoint written without importing ``torch.distributed.checkpoint``.

:mod:`.dcp_save` has DCP's own save write the file; importing DCP for it costs ~0.9 s of CPU (it pulls in
``torch.distributed.tensor`` and sympy), as much as copying a 1B model's 2.3 GiB. For the torch versions listed in
:data:`VERIFIED_TORCH` this module writes the same pickle: stand-ins that mirror DCP's metadata dataclasses (same
field names and order, the same ``__getstate__``) are pickled under DCP's module and class names, so that DCP,
unpickling, builds its own classes with the same values. ``test_offline_export_paths.py`` checks, for the installed
torch, that DCP reads back objects equal to what its own save writes. Any other torch, or a process that has
imported DCP already, takes the DCP path.
"""

from __future__ import annotations

import enum
import os
import pickle
import sys
import threading
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dist_ckpt import ChunkSpec, ObjectSpec, StoredItem

__all__ = ["VERIFIED_TORCH", "can_write_metadata", "write_metadata"]

VERIFIED_TORCH = ("2.15.",)
"""torch versions (prefixes of ``torch.__version__``) whose DCP metadata classes the stand-ins reproduce."""

_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
_DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION of the verified versions
_LOCK = threading.Lock()


def can_write_metadata() -> bool:
    """True where :func:`write_metadata` applies: a verified torch, and DCP not imported (then its save is free)."""
    return torch.__version__.startswith(VERIFIED_TORCH) and "torch.distributed.checkpoint" not in sys.modules


class _MEM_FORMAT_ENCODING(enum.Enum):  # noqa: N801 (DCP's name)
    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


@dataclass
class ChunkStorageMetadata:
    offsets: torch.Size
    sizes: torch.Size


@dataclass
class TensorProperties:
    dtype: torch.dtype
    layout: torch.layout = torch.strided
    requires_grad: bool = False
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False
    strides: tuple[int, ...] | None = None

    def __getstate__(self):  # DCP's: the memory format by its encoding
        return (self.dtype, self.layout, self.requires_grad, _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT,
                self.pin_memory, self.strides)


@dataclass
class TensorStorageMetadata:
    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    pass


@dataclass
class StorageMeta:
    checkpoint_id: str | os.PathLike | None = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    state_dict_metadata: dict
    planner_data: object = None
    storage_data: object = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


@dataclass(frozen=True)
class MetadataIndex:
    fqn: str
    offset: torch.Size | None = None
    index: int | None = field(hash=False, compare=False, default=None)


@dataclass
class _StorageInfo:
    relative_path: str
    offset: int
    length: int
    transform_descriptors: object = None

    def __getstate__(self):  # DCP's: None fields are left out
        return {k: v for k, v in self.__dict__.items() if v is not None}


_MODULES = {_METADATA: (_MEM_FORMAT_ENCODING, ChunkStorageMetadata, TensorProperties, TensorStorageMetadata,
                        BytesStorageMetadata, StorageMeta, Metadata, MetadataIndex),
            _FILESYSTEM: (_StorageInfo,)}
for _name, _classes in _MODULES.items():  # pickle names a class by its module and qualified name
    for _cls in _classes:
        _cls.__module__, _cls.__qualname__ = _name, _cls.__name__
del _name, _classes, _cls


def _metadata(directory: Path, chunks: list[ChunkSpec], objects: list[ObjectSpec],
              stored: dict[tuple, StoredItem]) -> Metadata:
    """What DCP's planner and file-system writer make of these items (``dcp_save``'s save, step by step)."""
    state, storage = {}, {}
    for chunk in chunks:
        entry = state.get(chunk.key)
        if entry is None:  # the first chunk's properties: strides only for a tensor saved whole
            whole = tuple(chunk.sizes) == tuple(chunk.global_shape)
            strides = torch.empty(chunk.global_shape, device="meta").stride() if whole else None
            entry = state[chunk.key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=chunk.dtype, strides=strides),
                size=torch.Size(chunk.global_shape), chunks=[])
        index = MetadataIndex(chunk.key, torch.Size(chunk.offsets), len(entry.chunks))
        entry.chunks.append(ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes)))
        where = stored[(chunk.key, tuple(chunk.offsets))]
        storage[index] = _StorageInfo(where.file, where.offset, where.length)
    for obj in objects:
        state[obj.unique_key] = BytesStorageMetadata()
        where = stored[(obj.unique_key, None)]
        storage[MetadataIndex(obj.unique_key)] = _StorageInfo(where.file, where.offset, where.length)
    return Metadata(state_dict_metadata=state, storage_data=storage, version=_DCP_VERSION,
                    storage_meta=StorageMeta(checkpoint_id=Path(directory), save_id=str(uuid.uuid4())))


def write_metadata(directory: str | os.PathLike, chunks: list[ChunkSpec], objects: list[ObjectSpec],
                   stored: dict[tuple, StoredItem]) -> bool:
    """Write ``directory/.metadata`` for chunks and objects stored where ``stored`` says (see the module docstring).

    Returns:
        False, having written nothing, when :func:`can_write_metadata` no longer holds (DCP was imported
        meanwhile): the caller writes the file with DCP's own save then.
    """
    if not can_write_metadata():
        return False
    metadata = _metadata(Path(directory), chunks, objects, stored)
    with _LOCK:
        # pickle checks that a class's module and name lead back to it: during the dump DCP's two module names
        # lead to modules holding the stand-ins (no such module is imported: can_write_metadata)
        installed = {name: types.ModuleType(name) for name in _MODULES}
        for name, classes in _MODULES.items():
            for cls in classes:
                setattr(installed[name], cls.__name__, cls)
        if any(name in sys.modules for name in installed):
            return False
        sys.modules.update(installed)
        try:
            with open(Path(directory) / ".metadata", "wb") as f:
                pickle.dump(metadata, f)
        finally:
            for name in installed:
                sys.modules.pop(name, None)
    return True
