"""The on-disk Megatron checkpoint format shared by bridge-convert and bridge-train.

```
<root>/
  latest_checkpointed_iteration.txt     # the iteration of the newest complete checkpoint, written last
  iter_0000000/                          # one directory per saved iteration (renamed into place when complete)
    .metadata, __*_*.distcp, common.pt, metadata.json   # megatron-core dist-checkpointing (torch_dist)
    bridge.json                          # format version, HF architecture + config, iteration, saved layout
    hf_assets/                           # tokenizer and generation config of the source HF model, if any
```
The dist-checkpoint holds ``{"model": chunk.sharded_state_dict()}`` (``model0``, ``model1``, ... with virtual
pipeline stages, as megatron-LM names them); bridge-train adds ``optimizer``, scheduler, RNG and data-loader state
to the same save. Tensors are keyed by global names, so a checkpoint saved at one TP/PP/VP layout loads at another.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .errors import CheckpointMismatchError
from .quantized import is_quantized_param, load_into_quantized

__all__ = [
    "FORMAT_VERSION",
    "TRACKER_FILE",
    "checkpoint_iteration_dir",
    "load_model_state",
    "read_checkpoint_metadata",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "sharded_model_state",
]

FORMAT_VERSION = 1
TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "bridge.json"
HF_ASSETS_DIR = "hf_assets"
HF_ASSET_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def checkpoint_iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """An iteration directory from either a checkpoint root (via its tracker) or the iteration directory itself.

    Raises:
        FileNotFoundError: if neither a tracker nor a complete iteration directory is found.
    """
    path = Path(path)
    if (path / METADATA_FILE).exists():
        return path
    tracker = path / TRACKER_FILE
    if tracker.exists():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise ValueError(f"{tracker} should hold an iteration number, found {text!r}")
        resolved = checkpoint_iteration_dir(path, int(text))
        if not (resolved / METADATA_FILE).exists():
            raise FileNotFoundError(f"{tracker} points at iteration {text}, but {resolved} is not a complete checkpoint")
        return resolved
    if path.is_file() and (path.name in (METADATA_FILE, TRACKER_FILE) or (path.parent / METADATA_FILE).exists()):
        raise FileNotFoundError(f"{path} is a file of a Megatron checkpoint; pass the directory that holds it, "
                                f"{path.parent}")
    raise FileNotFoundError(f"no Megatron checkpoint at {path} (expected {TRACKER_FILE} or {METADATA_FILE})")


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``bridge.json`` of a checkpoint (root or iteration directory).

    Raises:
        ValueError: naming the file, when it is not a JSON object (a damaged or hand-edited file) or is from a
            newer bridge-convert.
    """
    file = resolve_checkpoint_dir(path) / METADATA_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise ValueError(f"{file} is not valid JSON ({exc}): the checkpoint's metadata is damaged") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds a JSON {type(meta).__name__}, not the object bridge-convert writes: the "
                         "checkpoint's metadata is damaged")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{file}: format_version is {version!r}, not a number: the checkpoint's metadata is damaged")
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {version} is newer than this bridge-convert "
                         f"understands ({FORMAT_VERSION}); upgrade bridge-convert")
    return meta


def adapter_checkpoint_message(directory: str | os.PathLike) -> str | None:
    """What to say when the model's weights are asked of a PEFT checkpoint, which holds the adapters alone."""
    try:
        peft = read_checkpoint_metadata(directory).get("peft")
    except (OSError, ValueError):
        return None
    if not peft:
        return None
    return (f"{directory} is an adapter checkpoint ({peft.get('class', 'PEFT')}): it holds the adapters, not the "
            "model's weights; load the base model and apply the adapters (bridge-peft), or write an HF adapter / a "
            "merged HF model with `bridge-peft export-adapter` / `bridge-peft merge --base`")


def _load_failure(exc: BaseException) -> str:
    """torch.distributed.checkpoint's failure in a line: the first tensor the checkpoint lacks, when that is it."""
    text = str(exc)
    missing = re.search(r"'?([\w./]+) from model not in state dict", text)
    if missing:
        return f"it has no {missing.group(1)!r} (a checkpoint of another model or layer spec?)"
    return text.strip().splitlines()[0][:500] if text.strip() else type(exc).__name__


def sharded_model_state(chunks: list) -> dict[str, Any]:
    """``{"model": ...}`` or ``{"model0": ..., "model1": ...}``: the sharded state dicts of the model chunks."""
    from megatron.core.utils import unwrap_model

    modules = unwrap_model(chunks)
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    from megatron.core import parallel_state

    out = {}
    for i, module in enumerate(modules):
        parallel_state.set_virtual_pipeline_model_parallel_rank(i)
        out[f"model{i}"] = module.sharded_state_dict()
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return out


def _drop_missing_extra_states(request: dict[str, Any], keys: list[str], stored_objects) -> dict[str, set[str]]:
    """Take the model's ``_extra_state`` objects that the checkpoint lacks out of ``request``; returns their keys.

    They hold Transformer Engine's FP8 metadata. TE's attention and norm modules have one, megatron-core's and
    bridge-convert's own modules do not: a checkpoint saved with another layer spec or by the offline importer
    has none for them, and the module keeps its fresh state, as after a save without FP8.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    stored = set(stored_objects)
    dropped = {}
    for key in keys:
        state = request[key]
        dropped[key] = {k for k, v in state.items() if k.endswith("_extra_state") and isinstance(v, ShardedObject)
                        and v.unique_key not in stored}
        request[key] = {k: v for k, v in state.items() if k not in dropped[key]}
    return dropped


def _shape_problems(request: dict[str, Any], stored: dict, directory: Path, modules: list) -> list[str]:
    """Tensors whose saved global shape differs from the model's, and a vocabulary of another size.

    torch.distributed.checkpoint reports a shape mismatch without naming the tensor. The embedding and output
    layer are exempt in megatron-core (``allow_shape_mismatch``: their padded vocabulary depends on TP), so a
    checkpoint of another vocabulary loaded silently, rows cut off or left at their random init; the saved
    vocabulary size (``bridge.json``) is compared instead.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    problems, seen = [], set()
    for value in nested_values(request):
        if isinstance(value, ShardedTensor) and not value.allow_shape_mismatch and value.key in stored:
            saved, ours = tuple(stored[value.key].size), tuple(value.global_shape)
            if saved != ours and value.key not in seen:  # a tensor's shards share its key
                seen.add(value.key)
                problems.append(f"{value.key}: shape {saved} in the checkpoint, {ours} in this model")
    meta = read_checkpoint_metadata(directory)
    saved_vocab = (meta.get("hf_config") or {}).get("vocab_size")
    vocab = getattr(getattr(modules[0], "config", None), "vocab_size", None)
    if isinstance(saved_vocab, int) and isinstance(vocab, int) and saved_vocab != vocab:
        problems.append(f"it was saved with a vocabulary of {saved_vocab} tokens, this model has {vocab} "
                        "(model.vocab_size)")
    return problems[:6]


@contextmanager
def _in_process_write_results():
    """Collect writer results on a thread queue for a synchronous save.

    megatron-core's writer otherwise creates a multiprocessing Manager queue with the 'spawn' method, which costs
    ~5 s per process and re-imports the launching script (which then needs an ``if __name__ == "__main__"``
    guard). A synchronous save writes from threads of this process, so a thread queue carries the results.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    chunks: list,
    root: str | os.PathLike,
    *,
    iteration: int,
    metadata: dict[str, Any],
    extra_state: dict[str, Any] | None = None,
    hf_assets_from: str | os.PathLike | None = None,
    model_state: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
    sharded_strategy: Any = None,
) -> Path:
    """Save the model chunks (plus ``extra_state``, e.g. optimizer state) as one iteration of a checkpoint.

    Every rank calls this. The iteration is written into a temporary directory, renamed into place once
    complete, and only then is the tracker updated (atomically), so an interrupted save leaves the previous
    checkpoint as the latest one.

    Args:
        chunks: this rank's model chunks (wrapped or not).
        root: checkpoint root directory.
        iteration: training iteration (0 for a converted model).
        metadata: JSON-serialisable facts stored in ``bridge.json`` (HF config, architecture, ...).
        extra_state: more entries of the sharded state dict (``{"optimizer": ..., ...}``).
        hf_assets_from: an HF model directory whose tokenizer / generation config files are copied along.
        model_state: the chunks' sharded state (:func:`sharded_model_state`) when the caller already built it
            (an optimizer's sharded state refers to it).
        extra_files: file name -> text written by rank 0 into the iteration directory (e.g. the run's config).
        sharded_strategy: a megatron-core save strategy (e.g. a fully-parallel wrapper); default torch_dist.

    Returns:
        The iteration directory.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = checkpoint_iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    state = dict(model_state) if model_state is not None else sharded_model_state(chunks)
    state.update(extra_state or {})
    with _in_process_write_results():
        dist_checkpointing.save(state, str(tmp), sharded_strategy=sharded_strategy, async_sharded_save=False)
    if _rank() == 0:
        meta = {"format_version": FORMAT_VERSION, "iteration": iteration, **metadata}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if hf_assets_from is not None:
            assets = tmp / HF_ASSETS_DIR
            assets.mkdir()
            for name in HF_ASSET_FILES:
                src = Path(hf_assets_from) / name
                if src.exists():
                    shutil.copy2(src, assets / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER_FILE + ".tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, root / TRACKER_FILE)
    _barrier()
    return final


def load_model_state(chunks: list, path: str | os.PathLike, *, extra_state: dict[str, Any] | None = None,
                     strict: bool = True, model_state: dict[str, Any] | None = None,
                     fresh_model: bool = False, adapters: bool = False) -> dict[str, Any]:
    """Load a checkpoint's model weights into ``chunks`` (any TP/PP layout) and return the loaded extras.

    ``adapters``: ``model_state`` is a PEFT run's adapters (an adapter checkpoint is what it asks for, so a failure
    is reported as it is, not as "an adapter checkpoint holds no model weights").

    ``fresh_model``: the chunks were just built and their optimizer is not made yet (weights to start training
    from). Transformer Engine FP8 parameters then take the checkpoint's high-precision values through
    :func:`bridge_convert.quantized.load_into_quantized`, which the optimizer's main weights start from (a plain
    load changes only the FP8 bytes). A resume leaves it off: main weights and FP8 scales come from the checkpoint.

    Raises:
        FileNotFoundError / ValueError: for a missing or incompatible checkpoint; with ``strict`` a parameter that
            the checkpoint lacks is an error naming it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.utils import unwrap_model

    directory = resolve_checkpoint_dir(path)
    request = dict(model_state) if model_state is not None else sharded_model_state(chunks)
    request.update(extra_state or {})
    # Unexpected entries are fine (a training checkpoint also holds optimizer state); a missing one makes the
    # underlying torch.distributed.checkpoint load fail. (The StrictHandling modes that list missing keys read
    # tensor metadata via torch.empty(**TensorProperties), which fails in megatron-core 0.19.2 with torch 2.15,
    # whose TensorProperties has a `strides` field.)
    modules = unwrap_model(chunks)
    keys = ["model"] if len(modules) == 1 else [f"model{i}" for i in range(len(modules))]
    from .offline.dcp_metadata import read_metadata

    stored = read_metadata(directory)  # once: both checks below read it
    dropped = _drop_missing_extra_states(request, keys, stored.objects)
    problems = _shape_problems(request, stored.tensors, directory, modules)
    if problems:
        raise CheckpointMismatchError((None if adapters else adapter_checkpoint_message(directory)) or
                                      f"cannot load checkpoint {directory} into this model: " + "; ".join(problems))
    quantized = fresh_model and any(is_quantized_param(p) for m in modules for p in m.parameters())
    strategy = None
    if quantized:  # load FP8 weights as high-precision tensors (megatron's non-streaming path) to hand them over
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

        strategy = TorchDistLoadShardedStrategy(stream_ckpt_dequant=False)
    try:
        loaded = dist_checkpointing.load(request, str(directory), sharded_strategy=strategy,
                                         strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        raise CheckpointMismatchError((None if adapters else adapter_checkpoint_message(directory)) or
                                      f"cannot load checkpoint {directory} into this model: {_load_failure(exc)}"
                                      ) from exc
    for module, key in zip(modules, keys):
        state = loaded.pop(key, {})  # dist_checkpointing.load leaves out an empty entry
        result = module.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k not in dropped[key]]
        if strict and (missing or result.unexpected_keys):
            raise CheckpointMismatchError(f"checkpoint {directory} does not match this model: missing {missing}, "
                                          f"unexpected {result.unexpected_keys}")
        if quantized:
            for name, param in module.named_parameters():
                if is_quantized_param(param) and name in state:
                    load_into_quantized(param, state[name])
    return loaded
