"""The ``.metadata`` of a torch_dist checkpoint, read without importing ``torch.distributed.checkpoint``.

The file is a pickle of DCP's metadata dataclasses. Importing DCP to unpickle them costs ~1.2 s of CPU (with
bytecode; ~4 s without), which an export of a 1B checkpoint would pay before reading any tensor, against ~1 s for
``cp`` of its bytes. So the pickle is read with stand-ins for DCP's classes, allowing no other globals than
``torch.Size``, torch dtypes and the few helpers DCP pickles (nothing else in the file can run code), and
turned into the plain records below. A pickle this reader does not know (another torch's metadata classes) is
read by DCP itself into the same records.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CheckpointMetadata", "StoredLocation", "StoredTensor", "read_metadata"]

METADATA_FILE = ".metadata"


@dataclass(frozen=True)
class StoredTensor:
    """A global tensor: its shape, dtype and the chunks it is stored in (``(offsets, sizes)`` each)."""

    size: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


@dataclass(frozen=True)
class StoredLocation:
    """Where one chunk or object lies: data file, byte range, and any transforms applied when it was written."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: object = None


@dataclass(frozen=True)
class CheckpointMetadata:
    tensors: dict[str, StoredTensor]
    objects: list[str]
    storage: dict[tuple[str, tuple[int, ...] | None], StoredLocation]
    """``(key, chunk offsets)`` (offsets None for an object) -> location."""


class _UnknownPickle(Exception):
    """The pickle names a global or holds a structure this reader does not know: let DCP read it."""


class _Record:
    """A stand-in for one of DCP's metadata classes: keeps what the pickle gives it."""

    def __init__(self, *args) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) and \
                (state[0] is None or isinstance(state[0], dict)):  # (dict, slots) of a slotted class
            state = {**(state[0] or {}), **state[1]}
        if not isinstance(state, dict):
            raise _UnknownPickle(f"{type(self).__name__} pickled with a {type(state).__name__} state")
        self.__dict__.update(state)


class _TensorProperties(_Record):
    """DCP's ``TensorProperties`` pickles itself as a tuple that starts with the dtype."""

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and state and isinstance(state[0], torch.dtype):
            self.dtype = state[0]
        else:
            super().__setstate__(state)


_STAND_INS: dict[str, type] = {"TensorProperties": _TensorProperties}
_ALLOWED = {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
            ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint."):
            if name not in _STAND_INS:
                _STAND_INS[name] = type(name, (_Record,), {"__module__": __name__})
            return _STAND_INS[name]
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise _UnknownPickle(f"the metadata pickle names {module}.{name}")


def _records(raw) -> CheckpointMetadata:
    """The plain records of DCP's ``Metadata`` (the real one, or the stand-ins)."""
    tensors, objects = {}, []
    for key, item in raw.state_dict_metadata.items():
        if hasattr(item, "chunks"):
            if not isinstance(item.properties.dtype, torch.dtype):
                raise _UnknownPickle(f"{key}: dtype {item.properties.dtype!r}")
            chunks = tuple((tuple(c.offsets), tuple(c.sizes)) for c in item.chunks)
            tensors[key] = StoredTensor(tuple(item.size), item.properties.dtype, chunks)
        else:
            objects.append(key)
    storage = {}
    for index, info in raw.storage_data.items():
        offset = getattr(index, "offset", None)  # a dataclass default, so absent from some pickles
        offsets = None if offset is None else tuple(offset)
        storage[(index.fqn, offsets)] = StoredLocation(info.relative_path, int(info.offset), int(info.length),
                                                       getattr(info, "transform_descriptors", None))
    return CheckpointMetadata(tensors, objects, storage)


def read_metadata(directory: str | os.PathLike) -> CheckpointMetadata:
    """The metadata of the torch_dist checkpoint in ``directory``.

    Raises:
        OSError, EOFError, pickle.UnpicklingError, ...: the file is missing or damaged (the caller names it).
    """
    path = Path(directory) / METADATA_FILE
    with open(path, "rb") as f:
        try:
            return _records(_MetadataUnpickler(f).load())
        except (_UnknownPickle, AttributeError, TypeError):
            pass  # not the layout these stand-ins know: DCP's own classes read it
    from torch.distributed.checkpoint import FileSystemReader

    return _records(FileSystemReader(str(directory)).read_metadata())
