"""HF safetensors -> megatron-core torch_dist checkpoint, one layer slice at a time, without building the model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from ..finite import NonFinite
from ..hf_config import dtype_to_hf, load_hf_config, parse_dtype
from ..megatron_ckpt import FORMAT_VERSION, HF_ASSET_FILES, HF_ASSETS_DIR, METADATA_FILE, TRACKER_FILE
from ..outputs import CONVERTED_MARKER, check_output_dir, staged_output_dir
from ..registry import bridge_for_config
from ..safetensors_io import LazyHFCheckpoint, SourceLayout
from .dist_ckpt import ChunkSpec, ObjectSpec, write_dist_checkpoint
from .layout import (
    CheckpointEntry,
    checkpoint_entries,
    expected_megatron_shapes,
    extra_state_keys,
    model_config,
)
from .row_blocks import megatron_row_sources, source_blocks

__all__ = ["import_hf_checkpoint", "rounded_dtypes", "warn_if_rounded"]

logger = logging.getLogger(__name__)
_WIDER = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def rounded_dtypes(stored: set[torch.dtype], params_dtype: torch.dtype) -> list[str]:
    """The stored weight dtypes (by name) that ``params_dtype`` cannot hold every value of."""
    return sorted(dtype_to_hf(d) for d in stored if d != params_dtype and (d, params_dtype) not in _WIDER)


def warn_if_rounded(stored: set[torch.dtype], params_dtype: torch.dtype) -> None:
    """Say so when the config's dtype is narrower than the stored weights (a checkpoint saved in float32 whose
    config.json says bfloat16): converting to it rounds them, which no later export undoes."""
    narrower = rounded_dtypes(stored, params_dtype)
    if narrower:
        logger.warning("the HF config.json says %s but the weights are stored as %s: converting them to %s rounds "
                       "them; pass --dtype %s (dtype=%r) to keep every bit", dtype_to_hf(params_dtype),
                       " / ".join(narrower), dtype_to_hf(params_dtype), narrower[0], narrower[0])


class _LayerTensors:
    """Builds each (entry, layer) megatron tensor once through its mapping, as the chunks it is saved in, and
    hands them out.

    A mapping that only moves whole rows (the QKV interleave, gate / up halves, the identity) gives each chunk as
    row ranges of the HF tensors (:func:`~.row_blocks.source_blocks`): the fused tensor is never built and the
    mapped HF bytes reach the data file by an in-kernel copy. Others give their
    :meth:`~bridge_convert.mappings.Mapping.to_megatron_blocks`. A gated-MLP weight is saved as two chunks, its
    gate and up halves; they are kept until both have been taken, so memory holds at most the tensors of the
    chunks being written.
    """

    def __init__(self, reader: LazyHFCheckpoint, cfg, dtype: torch.dtype, progress) -> None:
        self.reader, self.cfg, self.dtype, self.progress = reader, cfg, dtype, progress
        self.non_finite = NonFinite()
        self._cache: dict[tuple[str, int | None], list] = {}
        self._row_sources: dict[tuple, tuple | None] = {}
        self._lock = threading.Lock()

    def _build(self, entry: CheckpointEntry, layer: int | None) -> list[torch.Tensor]:
        tensors = []
        for name in entry.hf_names(layer):
            tensor = self.reader.get_mapped(name)
            self.progress(tensor.nbytes)
            converted = tensor.to(self.dtype)
            self.non_finite.check(converted, {name: tensor})
            tensors.append(converted)
        shapes = [tuple(t.shape) for t in tensors]
        sources = self._sources(entry, shapes)
        if sources is None:
            return entry.mapping.to_megatron_blocks(tensors, entry.context(self.cfg, shapes))
        rows = len(sources[0]) // entry.mapping.stride
        return [source_blocks(sources, slice(i * rows, (i + 1) * rows), tensors) for i in range(entry.mapping.stride)]

    def _sources(self, entry: CheckpointEntry, shapes: list[tuple[int, ...]]):
        """Where each megatron row comes from (:func:`~.row_blocks.megatron_row_sources`), once per entry."""
        key = (entry.key, tuple(shapes))
        with self._lock:
            if key not in self._row_sources:
                self._row_sources[key] = megatron_row_sources(entry, self.cfg, shapes)
            return self._row_sources[key]

    def chunk(self, entry: CheckpointEntry, layer: int | None, piece: int, pieces: int
              ) -> torch.Tensor | list[torch.Tensor]:
        key = (entry.key, layer)
        with self._lock:
            slot = self._cache.setdefault(key, [threading.Lock(), None, pieces])
        with slot[0]:
            if slot[1] is None:
                slot[1] = self._build(entry, layer)
            blocks = slot[1]
            slot[2] -= 1
            if slot[2] == 0:
                with self._lock:
                    del self._cache[key]
        if len(blocks) != pieces:
            raise ValueError(f"{entry.key}: the mapping made {len(blocks)} blocks, the checkpoint stores {pieces}")
        part = blocks[piece]
        return part.unsqueeze(0) if layer is not None and isinstance(part, torch.Tensor) else part


def _plan(entries, reader: LazyHFCheckpoint, cfg, dtype: torch.dtype, tensors: _LayerTensors, bridge
          ) -> list[ChunkSpec]:
    """Every chunk of the checkpoint, with shapes checked against the model config before anything is written."""
    expected = expected_megatron_shapes(cfg)
    num_layers = cfg.num_layers
    used: set[str] = set()
    chunks: list[ChunkSpec] = []
    for entry in entries:
        layers = list(range(num_layers)) if entry.layered else [None]
        shape = None
        want = expected.get(entry.key)
        expected_hf = entry.hf_shapes(want, cfg) if want is not None else None
        for layer in layers:
            names = entry.hf_names(layer)
            missing = [n for n in names if n not in reader]
            if missing:
                raise ValueError(f"HF checkpoint {reader.path} is missing tensor {missing[0]!r} (needed for "
                                 f"{entry.key}{'' if layer is None else f' of layer {layer}'})")
            used.update(names)
            hf_shapes = [reader.shape_of(n) for n in names]
            if hf_shapes == expected_hf:
                this = want  # the shapes the config needs: no need to run the mapping on meta tensors
            else:
                try:
                    this = entry.megatron_shape(hf_shapes, cfg)
                except ValueError as exc:
                    raise ValueError(f"HF checkpoint {reader.path}: {exc}") from exc
            need = this if want is None else want
            if this != need or (shape is not None and this != shape):
                got = ", ".join(f"{n} {list(s)}" for n, s in zip(names, hf_shapes))
                raise ValueError(f"HF checkpoint {reader.path}: wrong shape: {got} make {entry.key} {list(this)}, the "
                                 f"config ({bridge.hf_architecture}) needs {list(need if this != need else shape)}")
            shape = this
        pieces = entry.mapping.stride
        if shape[0] % pieces:
            raise ValueError(f"{entry.key}: {shape[0]} rows do not split into {pieces} halves")
        global_shape = (num_layers, *shape) if entry.layered else shape
        piece_rows = shape[0] // pieces
        for layer in layers:
            for piece in range(pieces):
                offsets = [0] * len(global_shape)
                offsets[1 if entry.layered else 0] = piece * piece_rows
                if entry.layered:
                    offsets[0] = layer
                sizes = list(global_shape)
                sizes[1 if entry.layered else 0] = piece_rows
                if entry.layered:
                    sizes[0] = 1
                chunks.append(ChunkSpec(
                    entry.key, global_shape, tuple(offsets), tuple(sizes), dtype,
                    lambda e=entry, lay=layer, p=piece, n=pieces: tensors.chunk(e, lay, p, n)))
    allowed = set(used)
    if cfg.share_embeddings_and_output_weights:
        allowed.update(alias for alias, target in bridge.tied_aliases.items() if target in used)
    unexpected = sorted(n for n in set(reader.keys()) - allowed if not bridge.is_ignored(n))
    if unexpected:
        raise ValueError(f"HF checkpoint {reader.path} has {len(unexpected)} tensors the {bridge.hf_architecture} "
                         f"model built from its config does not have: {', '.join(unexpected[:10])}")
    tied = bridge.tied_alias_problems(reader, used) if cfg.share_embeddings_and_output_weights else []
    if tied:
        raise ValueError(f"HF checkpoint {reader.path}: " + "; ".join(tied))
    return chunks


def import_hf_checkpoint(hf_path: str | os.PathLike, megatron_path: str | os.PathLike, *,
                         dtype: torch.dtype | str | None = None, overwrite: bool = False, threads: int = 1,
                         progress: bool = True) -> Path:
    """Convert an HF checkpoint directory into a Megatron checkpoint that megatron-core loads at any layout.

    Writes ``megatron_path/latest_checkpointed_iteration.txt`` and ``iter_0000000/`` (torch_dist data,
    ``bridge.json``, the HF tokenizer and generation files) through :func:`staged_output_dir`, so the output
    appears only when complete.

    Args:
        hf_path: HF model directory (config.json + safetensors or .bin).
        megatron_path: output checkpoint root.
        dtype: parameter dtype of the checkpoint (default: the HF config's ``dtype`` / ``torch_dtype``).
        overwrite: replace a non-empty output (see :func:`bridge_convert.outputs.check_output_dir`).
        threads: writer threads (one data file each); each holds one chunk in memory.
        progress: show a progress bar in bytes read.

    Returns:
        The iteration directory.

    Raises:
        ValueError: an unsupported architecture, a missing, unexpected, wrongly shaped, truncated or
            non-finite tensor (named), or an unusable output (:class:`bridge_convert.outputs.OutputError`).
    """
    hf_path = Path(hf_path)
    config = load_hf_config(hf_path)  # a missing input is the first thing to say
    check_output_dir(megatron_path, overwrite=overwrite, inputs=[hf_path])
    bridge = bridge_for_config(config)
    cfg = model_config(bridge, config)
    params_dtype = parse_dtype(dtype) if dtype is not None else cfg.params_dtype
    reader = LazyHFCheckpoint(hf_path)
    if dtype is None:
        warn_if_rounded(reader.float_dtypes(bridge.is_ignored), params_dtype)
    entries = checkpoint_entries(bridge, cfg)
    lock = threading.Lock()

    def advance(n: int) -> None:  # tensors are read (and the bar made) only once the plan holds
        with lock:
            bar.update(n)

    tensors = _LayerTensors(reader, cfg, params_dtype, advance)
    chunks = _plan(entries, reader, cfg, params_dtype, tensors, bridge)
    objects = [ObjectSpec(key, None) for key in extra_state_keys(entries, cfg.num_layers)]
    objects.append(ObjectSpec("common_state/shard_0_1", {}))
    layout = SourceLayout.from_checkpoint(hf_path)
    saved_config = dict(config)
    saved_config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = \
        dtype_to_hf(params_dtype)
    metadata = {
        "format_version": FORMAT_VERSION, "iteration": 0, "architecture": bridge.hf_architecture,
        "hf_config": saved_config, "params_dtype": dtype_to_hf(params_dtype),
        "saved_layout": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                         "virtual_pipeline_model_parallel_size": None},
        CONVERTED_MARKER: "bridge-convert import (offline)",
    }
    if layout is not None:
        metadata["hf_source_layout"] = layout.to_json()
    needed = sum(c.nbytes for c in chunks)
    from tqdm.auto import tqdm

    # made after every check above: a refused import prints its error on a line of its own, not after a bar
    total = sum(torch.Size(reader.shape_of(n)).numel() * reader.dtype_of(n).itemsize for n in reader.keys()
                if not bridge.is_ignored(n))
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Importing", disable=not progress)
    try:
        with staged_output_dir(megatron_path, overwrite=overwrite, inputs=[hf_path], needed_bytes=needed) as tmp:
            directory = tmp / "iter_0000000"
            directory.mkdir()
            write_dist_checkpoint(directory, chunks, objects, threads=threads)
            problem = tensors.non_finite.problem(f"HF checkpoint {hf_path}", "import",
                                                 "--dtype bfloat16 or float32 (dtype='bfloat16')")
            if problem:
                raise ValueError(problem)
            (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str) + "\n")
            assets = directory / HF_ASSETS_DIR
            assets.mkdir()
            for name in HF_ASSET_FILES:
                if (hf_path / name).exists():
                    shutil.copy2(hf_path / name, assets / name)
            (tmp / TRACKER_FILE).write_text("0\n")
    finally:
        bar.close()
        reader.close()
    return Path(megatron_path) / "iter_0000000"
