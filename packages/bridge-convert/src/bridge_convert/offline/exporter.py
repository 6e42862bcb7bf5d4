"""megatron-core torch_dist checkpoint -> HF safetensors, one layer slice at a time, without building the model.

Reads the model tensors of any checkpoint megatron-core wrote (a conversion, or a training save with optimizer
state, at any TP / PP / VP layout) and writes them through the shard-preserving safetensors writer: when the
checkpoint remembers its HF source layout and the tensors match it, every tensor returns to its source file,
offset and dtype (unchanged weights give byte-identical files).
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch

from ..finite import NonFinite
from ..hf_config import parse_dtype
from ..megatron_ckpt import resolve_checkpoint_dir
from ..outputs import check_output_dir, staged_output_dir
from ..safetensors_io import DEFAULT_MAX_SHARD_SIZE, ShardedSafetensorsWriter, parse_size, sized_plan
from .dist_ckpt import DistCheckpointReader, assemble_region
from .layout import CheckpointEntry, checkpoint_entries, expected_megatron_shapes, model_config
from .row_blocks import hf_row_runs, row_blocks

__all__ = ["export_megatron_checkpoint"]


def _check_stored(entries: list[CheckpointEntry], reader: DistCheckpointReader, cfg) -> dict[str, tuple]:
    """The per-layer megatron shape of every entry, checked against the model config (named errors)."""
    stored = reader.tensor_keys()
    expected = expected_megatron_shapes(cfg)
    shapes = {}
    for entry in entries:
        md = stored.get(entry.key)
        if md is None:
            from ..megatron_ckpt import adapter_checkpoint_message

            raise ValueError(adapter_checkpoint_message(reader.directory) or
                             f"checkpoint {reader.directory} has no tensor {entry.key!r}, which the model of its "
                             f"config needs; is it a checkpoint of this model?")
        size = tuple(md.size)
        if entry.layered:
            if size[0] != cfg.num_layers:
                raise ValueError(f"checkpoint {reader.directory}: {entry.key} stacks {size[0]} layers, the config "
                                 f"has num_hidden_layers={cfg.num_layers}")
            size = size[1:]
        want = expected.get(entry.key, size)
        vocab_ok = entry.key.startswith(("embedding.", "output_layer.")) and size[0] >= cfg.vocab_size \
            and size[1:] == want[1:]
        if size != want and not vocab_ok:
            raise ValueError(f"checkpoint {reader.directory}: wrong shape: {entry.key} is {list(size)}, the config "
                             f"needs {list(want)}")
        shapes[entry.key] = size
    return shapes


def export_megatron_checkpoint(megatron_path: str | os.PathLike, hf_path: str | os.PathLike, *,
                               dtype: torch.dtype | str | None = None, max_shard_size: int | str | None = None,
                               overwrite: bool = False, threads: int = 2, progress: bool = True) -> None:
    """Convert a Megatron checkpoint (root or ``iter_*`` directory) into an HF model directory.

    Args:
        megatron_path: the checkpoint; its ``bridge.json`` names the architecture and HF config.
        hf_path: output directory, written whole or not at all.
        dtype: HF tensor dtype; default: the source checkpoint's layout and dtypes when the tensors match it,
            else the checkpoint's own dtype. Given, files are cut at ``max_shard_size``.
        max_shard_size: largest safetensors file; given, the files are cut at it even where the source layout
            would be reproduced (keeping the source dtypes). Default: the source's files, else 5GB.
        overwrite: replace a non-empty output (see :func:`bridge_convert.outputs.check_output_dir`).
        threads: tensors read ahead in parallel (each holds one layer slice of one tensor).
        progress: show a progress bar in bytes written.

    Raises:
        ValueError: a missing, wrongly shaped or unreadable tensor or data file (named), or an unusable output.
    """
    from ..auto_bridge import AutoBridge, record_tensor_dtype

    directory = resolve_checkpoint_dir(megatron_path)  # a missing input is the first thing to say
    if max_shard_size is not None:
        parse_size(max_shard_size)
    check_output_dir(hf_path, overwrite=overwrite, inputs=[megatron_path])
    bridge = AutoBridge.from_megatron_checkpoint(directory)
    cfg = model_config(bridge.model_bridge, bridge.hf_config)
    reader = DistCheckpointReader(directory)
    entries = checkpoint_entries(bridge.model_bridge, cfg)
    shapes = _check_stored(entries, reader, cfg)
    stored_dtypes = {k: md.dtype for k, md in reader.tensor_keys().items()}

    tasks = [(e, None) for e in entries if not e.layered and e.key.startswith("embedding.")]
    tasks += [(e, layer) for layer in range(cfg.num_layers) for e in entries if e.layered]
    tasks += [(e, None) for e in entries if not e.layered and not e.key.startswith("embedding.")]
    hf_shapes: list[tuple[str, tuple[int, ...]]] = []
    for entry, layer in tasks:
        shape = shapes[entry.key]
        outs = entry.mapping.to_hf(torch.empty(shape, device="meta"), entry.context(cfg, megatron_shape=shape))
        hf_shapes += [(n, tuple(t.shape)) for n, t in zip(entry.hf_names(layer), outs)]
    tie = SimpleNamespace(share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
                          generation_config=None)
    layout, aliases = bridge._matching_source_layout(tie, hf_shapes) if dtype is None else (None, {})
    source_of = {n: e.key for (e, layer) in tasks for n in e.hf_names(layer)}
    if layout is not None:
        dtypes = layout.dtypes
    else:
        target = parse_dtype(dtype) if dtype is not None else None
        dtypes = {n: target or stored_dtypes[source_of[n]] for n, _ in hf_shapes}
    total = sum(torch.Size(s).numel() * dtypes[n].itemsize for n, s in hf_shapes)

    runs = {e.key: hf_row_runs(e, cfg, shapes[e.key]) for e in entries}
    spare: dict[str, list[torch.Tensor]] = {}  # region buffers by key, reused from layer to layer
    spare_lock = threading.Lock()

    non_finite = NonFinite()

    def cast(name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in the HF dtype; a cast that makes NaN / inf is recorded (a tensor kept in its dtype is copied
        byte for byte, unread: only a cast can make them here)."""
        converted = tensor.to(dtypes[name])
        if converted.dtype != tensor.dtype:
            non_finite.check(converted, {name: tensor})
        return converted

    def read(entry: CheckpointEntry, layer: int | None) -> tuple[list[tuple[str, list[torch.Tensor]]], tuple]:
        """The HF tensors of one entry's layer slice, each as row blocks (see ``ShardedSafetensorsWriter.add_rows``)."""
        shape = shapes[entry.key]
        region = ((1,) if entry.layered else ()) + shape
        offsets = ((layer,) + (0,) * len(shape)) if entry.layered else (0,) * len(shape)
        pieces = reader.region_pieces(entry.key, offsets, region)
        names = entry.hf_names(layer)
        blocks = row_blocks(runs[entry.key], pieces, region, entry.layered) if runs[entry.key] else None
        if blocks is not None:  # row ranges of the stored (mapped) chunks: no assembly, no de-interleaved copy
            return [(n, [cast(n, b) for b in bs]) for n, bs in zip(names, blocks)], (entry.key, None)
        with spare_lock:
            free = spare.setdefault(entry.key, [])
            buffer = free.pop() if free else None
        if buffer is None:  # untouched (so not resident) unless the region is assembled from several chunks
            buffer = torch.empty(region, dtype=stored_dtypes[entry.key])
        full = assemble_region(pieces, region, out=buffer)
        full = full[0] if entry.layered else full
        outs = entry.mapping.to_hf(full, entry.context(cfg, megatron_shape=shape))
        return [(n, [cast(n, t)]) for n, t in zip(names, outs)], (entry.key, buffer)

    from tqdm.auto import tqdm

    config = dict(bridge.hf_config)
    with staged_output_dir(hf_path, overwrite=overwrite, inputs=[megatron_path], needed_bytes=total) as tmp, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Exporting",
                 disable=not progress) as bar, ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        if layout is not None and max_shard_size is None:
            writer = ShardedSafetensorsWriter.from_source(tmp, layout)
        else:
            writer = ShardedSafetensorsWriter.by_size(tmp, sized_plan(hf_shapes, dtypes, aliases),
                                                      max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        pending: deque = deque()
        queue = iter(tasks)
        for task in queue:
            pending.append(pool.submit(read, *task))
            if len(pending) >= max(1, threads):
                break
        while pending:
            tensors, (key, buffer) = pending.popleft().result()
            for name, parts in tensors:
                writer.add_rows(name, parts)
                for alias in aliases.get(name, ()):
                    writer.add_rows(alias, [p.to(dtypes[alias]) for p in parts])
                bar.update(sum(p.nbytes for p in parts))
                del parts
            del tensors
            if buffer is not None:
                with spare_lock:  # written: the buffer may take the next layer's region
                    spare[key].append(buffer)
            task = next(queue, None)
            if task is not None:
                pending.append(pool.submit(read, *task))
        problem = non_finite.problem(f"Megatron checkpoint {directory}", "export",
                                     "--dtype bfloat16 or float32 (dtype='bfloat16')")
        if problem:
            raise ValueError(problem)
        writer.close()
        record_tensor_dtype(config, {n: dtypes[n] for n, _ in hf_shapes})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        bridge._write_assets(tmp, tie)
