"""Training checkpoints: bridge-convert's Megatron checkpoint format plus the state an exact resume needs.

One iteration directory holds (megatron-core dist-checkpointing, written to ``iter_*.tmp`` and renamed when
complete; the ``latest_checkpointed_iteration.txt`` tracker is replaced only after that, so a process killed
mid-save leaves the previous checkpoint as the latest):

- ``model`` / ``model0..``: the weights, in bridge-convert's format, so ``bridge-convert export`` reads them;
- ``optimizer``: megatron-core's optimizer state (``fully_reshardable`` for the distributed optimizer);
- ``rng_state``: every rank's Python / NumPy / torch / CUDA / model-parallel-tracker RNG states;
- common entries: ``opt_param_scheduler`` and ``train_state`` (iteration, consumed samples, ...);
- ``run_config.yaml``: the resolved config of the run.

With ``checkpoint.async_save`` the tensors are planned and staged at the save iteration (all ranks together),
written by a forked process per rank (megatron-core's ``AsyncCallsQueue``) while training goes on, and finalized
(DCP ``.metadata``, ``bridge.json``, rename, tracker) at a later iteration once every rank's writer has finished.
An existing ``iter_*`` directory is never overwritten: a save into one is refused.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bridge_convert.errors import CheckpointMismatchError
from bridge_convert.hf_config import fill_token_ids_from_tokenizer
from bridge_convert.megatron_ckpt import (
    FORMAT_VERSION,
    HF_ASSET_FILES,
    HF_ASSETS_DIR,
    METADATA_FILE,
    TRACKER_FILE,
    checkpoint_iteration_dir,
    load_model_state,
    read_checkpoint_metadata,
    sharded_model_state,
)

from .checkpoint_discovery import (
    ITER_DIR,
    CheckpointError,
    find_resume_checkpoint,
    unreadable_checkpoint_error,
)
from .resume_schedule import describe_schedule, reconcile_param_groups

__all__ = ["AsyncSaves", "CheckpointError", "TrainState", "adapter_only_checkpoints", "check_save_dir_writable",
           "check_save_hf", "find_resume_checkpoint", "load_training_checkpoint", "save_training_checkpoint"]

logger = logging.getLogger("bridge")

RUN_CONFIG_FILE = "run_config.yaml"
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


@dataclass(kw_only=True)
class TrainState:
    """Counters that make a resumed run continue exactly where the saved one stopped."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0
    floating_point_operations_so_far: float = 0.0
    train_samples: int = 0
    """Training samples the run's dataset was built for (0: not recorded, a checkpoint of an older bridge-train);
    a resume builds at least as many, so that the dataset, and megatron-core's sample order, stay the same."""
    valid_samples: int = 0
    """Validation samples the run's dataset was built for; likewise."""
    world_size: int = 1
    """World size of the run that saved; RNG states are restored only into the same world."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _rng_state(state) -> dict[str, Any]:
    from megatron.core import tensor_parallel

    out = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if not state.on_cpu:
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(saved: dict[str, Any], state) -> None:
    from megatron.core import tensor_parallel

    random.setstate(saved["random"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and not state.on_cpu:
        torch.cuda.set_rng_state(saved["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(saved["tracker"])


def _rng_sharded_object(state, value):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", value, (state.world_size,), (state.rank,), replica_id=0)


def check_save_hf(cfg, bridge) -> None:
    """``checkpoint.save_hf`` can be done: refused before anything is built otherwise (not at the first save).

    Raises:
        CheckpointError: the model has no HF form (no bridge), a PEFT method without ``save_hf(bridge, model,
            path)``, or checkpoints inside the HF directory the model came from (an export never writes there).
    """
    if not cfg.checkpoint.save_hf:
        return
    if bridge is None:
        raise CheckpointError("checkpoint.save_hf needs a model with an HF architecture (a provider from "
                              "bridge_convert.AutoBridge); set checkpoint.save_hf=false")
    if cfg.peft is not None and not callable(getattr(cfg.peft, "save_hf", None)):
        raise CheckpointError(f"checkpoint.save_hf with peft={type(cfg.peft).__name__}: it has no save_hf(bridge, "
                              "model, path) to export its adapters, and the model's own HF export would hold the "
                              "base weights only; set checkpoint.save_hf=false and export from the checkpoint")
    source = getattr(bridge, "hf_path", None)
    if source is not None and cfg.peft is None:
        save, source = Path(cfg.checkpoint.save).resolve(), Path(source).resolve()
        if save == source or source in save.parents:
            raise CheckpointError(f"checkpoint.save={cfg.checkpoint.save} is inside the HF directory {source} the "
                                  "model was loaded from, which checkpoint.save_hf never writes into; save the "
                                  "checkpoints elsewhere or set checkpoint.save_hf=false")


def check_save_dir_writable(save_dir: str) -> None:
    """Create ``save_dir`` and write a probe file into it, before any model is built.

    Raises:
        CheckpointError: naming the directory and the OS's reason (read-only file system, permission, a file in
            the way, no space).
    """
    root = Path(save_dir)
    probe = root / f".write-probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"checkpoint.save={save_dir} is not writable ({exc.strerror or exc}); point "
                              "checkpoint.save at a writable directory") from None


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _agree(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _find_no_space(exc: BaseException, seen: set[int] | None = None) -> bool:
    """Whether an ENOSPC / EDQUOT error is somewhere in ``exc``'s chain (DCP wraps per-rank failures in a
    ``CheckpointException``)."""
    seen = set() if seen is None else seen
    if id(exc) in seen:
        return False
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    children = [exc.__cause__, exc.__context__]
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        children += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return any(_find_no_space(child, seen) for child in children if isinstance(child, BaseException))


class _WriterErrors(logging.Handler):
    """Collects megatron-core's file-writer error log lines: its threaded writer reports a worker's ``OSError``
    there and raises only ``<class 'OSError'>``, losing the errno."""

    _LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> _WriterErrors:
        logging.getLogger(self._LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(self._LOGGER).removeHandler(self)

    def no_space(self) -> bool:
        marks = [f"[Errno {n}]" for n in _NO_SPACE]
        return any(mark in line for line in self.lines for mark in marks)


def _checkpoint_bytes(state: dict, device: torch.device) -> int:
    """Bytes of tensor data the save writes, summed over all ranks (each tensor's main replica once)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    local = sum(v.data.numel() * v.data.element_size() for v in nested_values(state)
                if isinstance(v, ShardedTensor) and v.data is not None and is_main_replica(v.replica_id))
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    total = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        return 2**62


def _no_space_error(path: Path, needed: int | None) -> CheckpointError:
    free = _free_bytes(path)
    sizes = []
    if needed:
        sizes.append(f"needs about {needed / 2**20:,.1f} MiB")
    if free < 2**62:
        sizes.append(f"{free / 2**20:,.1f} MiB free")
    detail = f" ({', '.join(sizes)})" if sizes else ""
    return CheckpointError(f"no space left on the device while saving the checkpoint to {path}{detail}; free "
                           "space there or set checkpoint.save to a larger disk (the previous checkpoint is intact)")


@contextmanager
def _write_results_queue(async_save: bool):
    """The queue megatron-core's file writer reports its results on.

    Its default is a ``spawn`` Manager queue (~5 s per process, and it re-imports the launching script). A
    synchronous save writes from threads of this process (a thread queue suffices); an asynchronous one from a
    forked child (a fork-context queue, made before the fork, reaches the parent).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    if async_save:
        import multiprocessing as mp

        filesystem_async._results_queue = mp.get_context("fork").Queue()
    else:
        filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


class AsyncSaves:
    """The background checkpoint writes of one run (megatron-core's ``AsyncCallsQueue``, one forked writer per
    save and rank). Every rank calls :meth:`poll` once per iteration and :meth:`wait` before exiting."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self._paths: list[Path] = []

    @property
    def pending(self) -> int:
        return self._queue.get_num_unfinalized_calls()

    def schedule(self, request, path: Path) -> None:
        self._paths.append(path)
        self._queue.schedule_async_request(request)

    def poll(self) -> None:
        """Finalize the saves whose writers have finished on every rank (one all-reduce while any is pending)."""
        if self.pending:
            self._finalize(blocking=False)

    def wait(self) -> None:
        """Block until every pending save is durable and finalized."""
        if self.pending:
            self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        try:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            reason = ("no space left on the device" if _find_no_space(exc) or "No space left" in str(exc)
                      else (str(exc).strip().splitlines() or [type(exc).__name__])[-1])
            raise CheckpointError(f"the background save to {self._paths[0]} failed ({reason}); the previous "
                                  "checkpoint stays the latest") from None
        del self._paths[:len(self._paths) - self.pending]


def save_training_checkpoint(run, train_state: TrainState, *, async_saves: AsyncSaves | None = None) -> Path:
    """Save model, optimizer, scheduler, RNG, counters and the resolved config as ``train_state.iteration``.

    Every rank calls this. ``run`` is the :class:`bridge_train.setup.TrainingRun`. With ``async_saves`` the
    files are written in the background and the iteration becomes the latest only when
    :meth:`AsyncSaves.poll` / :meth:`AsyncSaves.wait` finalizes it.

    Raises:
        CheckpointError: the iteration directory exists already (never overwritten), or the disk is full.
    """
    from megatron.core import dist_checkpointing

    cfg, state = run.cfg, run.parallel
    root = Path(cfg.checkpoint.save)
    iteration = train_state.iteration
    final = checkpoint_iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if not _agree(not final.exists(), state.device):
        raise CheckpointError(f"refusing to save iteration {iteration}: {final} exists already (a checkpoint "
                              "this run did not write is never overwritten); move it away, or set checkpoint.save "
                              "to another directory")
    model_state = _model_state(run)
    extra: dict[str, Any] = {
        "opt_param_scheduler": run.scheduler.state_dict(),
        "train_state": asdict(train_state),
    }
    if cfg.checkpoint.save_optim:
        extra["optimizer"] = run.optimizer.sharded_state_dict(model_state, metadata=_OPTIMIZER_METADATA)
    if cfg.checkpoint.save_rng:
        extra["rng_state"] = _rng_sharded_object(state, _rng_state(state))
    extra["saved_entries"] = sorted(k for k in ("optimizer", "rng_state") if k in extra)
    sharded = {**model_state, **extra}
    if run.bridge is not None:
        metadata = {"format_version": FORMAT_VERSION, "iteration": iteration,
                    **run.bridge.checkpoint_metadata(run.model)}
        assets = run.bridge.hf_path
    else:
        metadata, assets = {"format_version": FORMAT_VERSION, "iteration": iteration, "architecture": None}, None
    if adapter_only_checkpoints(cfg):
        base = cfg.checkpoint.pretrained_checkpoint
        # the base the adapters were trained on, for `bridge-peft merge` (the checkpoint keeps no base weights)
        metadata = {**metadata, "peft": {**_peft_metadata(cfg.peft),
                                         "base": str(Path(base).resolve()) if base else None,
                                         "base_fingerprint": run.extras.get("base fingerprint")}}
    files = {METADATA_FILE: json.dumps(metadata, indent=2, default=str) + "\n", RUN_CONFIG_FILE: cfg.to_yaml()}
    tokenizer = _training_tokenizer(run) if run.bridge is not None else None
    needed = _checkpoint_bytes(sharded, state.device)

    def finalize() -> None:
        """Runs on every rank once all writers are done: rank 0 completes the directory and moves the tracker."""
        if state.rank == 0:
            for name, text in files.items():
                (tmp / name).write_text(text)
            if assets is not None or tokenizer is not None:  # a model without HF files still has its tokenizer
                (tmp / HF_ASSETS_DIR).mkdir()
                for name in HF_ASSET_FILES if assets is not None else ():
                    if (Path(assets) / name).exists():
                        shutil.copy2(Path(assets) / name, tmp / HF_ASSETS_DIR / name)
                _put_tokenizer(tmp / HF_ASSETS_DIR, tokenizer)
            os.replace(tmp, final)
            tracker_tmp = root / (TRACKER_FILE + ".tmp")
            tracker_tmp.write_text(f"{iteration}\n")
            os.replace(tracker_tmp, root / TRACKER_FILE)
        _barrier()
        if state.rank == 0:
            _prune(root, keep=cfg.checkpoint.keep_last_n, current=iteration)

    if async_saves is not None:
        async_saves.wait()  # one save in flight at a time: its leftovers are pruned by the next one
    writer_errors = _WriterErrors()
    try:
        if state.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # a leftover of an interrupted save of this very iteration
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        if not _agree(_free_bytes(tmp) >= needed, state.device):  # too little room (on a shared file system)
            raise _no_space_error(tmp, needed)
        if cfg.checkpoint.save_hf:  # now: the weights move on during an async save
            if cfg.peft is not None:  # the adapters (the base is the pretrained checkpoint's)
                cfg.peft.save_hf(run.bridge, run.model, tmp / "hf_adapter")
            else:
                run.bridge.save_hf_pretrained(run.model, tmp / "hf")
                if state.rank == 0:
                    _put_tokenizer(tmp / "hf", tokenizer)
                    if tokenizer is not None:
                        fill_token_ids_from_tokenizer(tmp / "hf")
        with _write_results_queue(async_saves is not None), writer_errors:
            request = dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_save_strategy(run),
                                              async_sharded_save=async_saves is not None, async_strategy="mcore")
        if async_saves is None:
            finalize()
    except BaseException as exc:
        no_space = isinstance(exc, CheckpointError) or _find_no_space(exc) or writer_errors.no_space()
        if not no_space:
            raise
        if state.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _no_space_error(tmp, needed) from None
    if async_saves is not None:
        request.add_finalize_fn(finalize)
        async_saves.schedule(request, tmp)
    return final


def adapter_only_checkpoints(cfg) -> bool:
    """True when ``cfg.peft`` can filter the model state to its adapters (bridge-peft's methods can): the
    checkpoints then hold adapters + optimizer state only, and the base comes from ``pretrained_checkpoint``."""
    return callable(getattr(cfg.peft, "filter_sharded_state_dict", None))


def _model_state(run) -> dict[str, Any]:
    """The model part of a checkpoint: all weights, or only the adapters of a PEFT run."""
    state = sharded_model_state(run.model)
    return run.cfg.peft.filter_sharded_state_dict(state) if adapter_only_checkpoints(run.cfg) else state


def _peft_metadata(peft) -> dict[str, Any]:
    """The PEFT method in ``bridge.json``: class path and (dataclass) fields, so tools can rebuild it."""
    import dataclasses

    fields = ({f.name: getattr(peft, f.name) for f in dataclasses.fields(peft) if f.init}
              if dataclasses.is_dataclass(peft) else {})
    return {"class": f"{type(peft).__module__}.{type(peft).__qualname__}", "fields": fields}


def _training_tokenizer(run):
    """The HF tokenizer the run trains with when it is not the model's own files (another ``tokenizer.path``, or
    a ``tokenizer.chat_template`` the SFT data was rendered with): the checkpoint's HF assets, hence its exports,
    carry that one. None: the model directory's tokenizer files are copied as they are."""
    tokenizer_cfg, hf = run.cfg.tokenizer, getattr(run.tokenizer, "hf_tokenizer", None)
    if hf is None or tokenizer_cfg is None or not tokenizer_cfg.path:
        return None
    own = run.bridge.hf_path is not None and Path(tokenizer_cfg.path).resolve() == Path(run.bridge.hf_path).resolve()
    return None if own and tokenizer_cfg.chat_template is None else hf


def _put_tokenizer(directory: Path, tokenizer) -> None:
    """Replace the tokenizer files copied into ``directory`` by ``tokenizer``'s own (None: keep them)."""
    if tokenizer is None:
        return
    for name in HF_ASSET_FILES:
        if name != "generation_config.json" and (directory / name).exists():
            (directory / name).unlink()
    tokenizer.save_pretrained(str(directory))


def _peft_differences(peft, path: Path) -> list[str]:
    """How ``peft`` differs from the PEFT method recorded in checkpoint ``path``'s ``bridge.json``."""
    try:
        saved = json.loads((Path(path) / METADATA_FILE).read_text()).get("peft")
    except (OSError, ValueError):
        return []
    if not saved:
        return ["the checkpoint records no PEFT method: it is a full-model checkpoint (to fine-tune from its "
                "weights, point checkpoint.pretrained_checkpoint at it)"]
    ours = json.loads(json.dumps(_peft_metadata(peft), default=str))
    if saved.get("class") != ours["class"]:
        return [f"method {saved.get('class')} (checkpoint) vs {ours['class']} (config)"]
    theirs = saved.get("fields", {})
    return [f"{name}: {theirs.get(name)!r} (checkpoint) vs {value!r} (config)" for name, value in ours["fields"].items()
            if name in theirs and theirs[name] != value]


def _saved_run_config(path: Path) -> dict[str, Any]:
    """The resolved config of the run that saved checkpoint ``path`` as plain data; empty if it cannot be read."""
    import yaml

    try:
        saved = yaml.safe_load((Path(path) / RUN_CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _same_base(run, path: Path) -> bool | None:
    """Whether the base weights of this run are those the adapters in checkpoint ``path`` were trained on, by the
    fingerprint both record (on the rank that holds them; None elsewhere and for checkpoints without one)."""
    from bridge_convert.weights_fingerprint import same_weights

    current = run.extras.get("base fingerprint")
    if current is None:
        return None
    try:
        recorded = (read_checkpoint_metadata(path).get("peft") or {}).get("base_fingerprint")
    except (OSError, ValueError):
        return None
    return same_weights(recorded, current)


def _saved_pretrained_checkpoint(saved: dict[str, Any]) -> str | None:
    """``checkpoint.pretrained_checkpoint`` of the run whose resolved config is ``saved``."""
    value = (saved.get("checkpoint") or {}).get("pretrained_checkpoint")
    return value if isinstance(value, str) else None


_DATA_SOURCE_FIELDS = ("mock", "paths", "path", "valid_path", "test_path", "split")
"""Dataset fields that say which samples a run reads (a resumed run skips the saved run's consumed samples)."""


def _data_differences(cfg, saved: dict[str, Any]) -> list[str]:
    """How this run's dataset differs from that of the run whose resolved config is ``saved``: its class, or a
    field naming the data (:data:`_DATA_SOURCE_FIELDS`)."""
    from .config.yaml_io import to_dict

    theirs = saved.get("dataset")
    ours = to_dict(cfg, warn=False).get("dataset")
    if not isinstance(theirs, dict) or not isinstance(ours, dict):
        return []
    if theirs.get("_target_") != ours.get("_target_"):
        return [f"dataset {theirs.get('_target_')} (checkpoint) vs {ours.get('_target_')} (config)"]
    return [f"dataset.{name}: {theirs[name]!r} (checkpoint) vs {ours[name]!r} (config)" for name in
            _DATA_SOURCE_FIELDS if name in theirs and name in ours and theirs[name] != ours[name]]


def _save_strategy(run):
    """torch_dist, with the writing of replicated tensors spread over the data-parallel ranks when asked."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    if not run.cfg.checkpoint.fully_parallel_save or run.parallel.dp_size == 1:
        return get_default_save_sharded_strategy()
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                            run.parallel.dp_group(with_context_parallel=True))


def _prune(root: Path, *, keep: int | None, current: int) -> None:
    """Delete leftovers of interrupted saves and all but the newest ``keep`` complete checkpoints."""
    for stale in root.glob("iter_*.tmp"):
        if stale.name != f"iter_{current:07d}.tmp":
            shutil.rmtree(stale, ignore_errors=True)
    if not keep:
        return
    # iteration directories only (an ``iter_N.damaged`` kept by a fallback also holds metadata), and none past the
    # one just saved: a run resumed from an earlier checkpoint keeps the later ones of the run it branched from
    # (newest by number, they had made it delete the checkpoint it just saved, which the tracker names)
    complete = sorted((p for p in root.iterdir() if ITER_DIR.match(p.name) and p.is_dir()
                       and (p / METADATA_FILE).exists() and int(p.name.removeprefix("iter_")) <= current),
                      key=lambda p: int(p.name.removeprefix("iter_")))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _materialize_optimizer_state(optimizer) -> None:
    """Let a fresh distributed optimizer describe its state for loading.

    megatron-core's ``DistributedOptimizer`` reads the inner optimizer's state (``step`` included) to build its
    sharded state dict; torch's Adam, which it uses without Transformer Engine or apex (the native spec, CPU),
    creates that state at its first step only, so a resume before any step failed (``assert len(steps) == 1``).
    megatron-core's own placeholder step (zero gradients on the fp32 shards) creates it; the checkpoint's main
    weights, moments and step then replace everything it wrote. The model weights are not touched.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, distrib_optimizer.DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def check_optimizer_checkpointable(optimizer, device: torch.device) -> None:
    """Refuse, before training, an optimizer whose checkpoint megatron-core 0.19 cannot write or read back: a rank
    that holds no trainable parameter (a pipeline stage none of whose layers ``cfg.peft`` adapts) while others do.

    - The optimizer state every rank shares (param groups, hence torch Adam's ``step``) is saved by rank 0
      alone: without parameters on rank 0, a resume of the other stages fails (torch Adam: KeyError 'step');
    - the distributed optimizer with torch's Adam (no Transformer Engine / apex) reads the step from its shard's
      parameter state and asserts there is one, so any empty rank fails at the first save.

    Every rank raises the same error, so a run stops before it trains rather than at its first checkpoint.
    """
    from megatron.core.optimizer import distrib_optimizer

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    empty = not any(g["params"] for o in inner for g in o.optimizer.param_groups)
    distributed = any(isinstance(o, distrib_optimizer.DistributedOptimizer) for o in inner)
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    flags[dist.get_rank()] = int(empty)
    dist.all_reduce(flags)
    ranks = [r for r, flag in enumerate(flags.tolist()) if flag]
    if not ranks or len(ranks) == len(flags):
        return
    if 0 in ranks or (distributed and not distrib_optimizer.HAVE_APEX_OR_TE):
        where = "rank 0, whose copy of the optimizer's shared state the checkpoint keeps" if 0 in ranks else \
            "the distributed optimizer without Transformer Engine or apex"
        raise CheckpointError(
            f"rank(s) {ranks} hold no trainable parameter (a pipeline stage none of whose layers cfg.peft adapts): "
            f"megatron-core cannot checkpoint the optimizer of such a run ({where}), so it could not save or "
            "resume. Adapt modules in every pipeline stage (e.g. target every layer)"
            + ("" if 0 in ranks else
               ", or set optimizer.use_distributed_optimizer=false ddp.use_distributed_optimizer=false"))


@contextmanager
def _torch_adam_step_fixes(optimizer):
    """Around a distributed optimizer's ``load_state_dict`` with torch's Adam (no TE / apex), two megatron-core
    0.19 defects that made a resume fail or diverge:

    - it copies every tensor of each parameter's inner state from the loaded parameter state, which never holds
      ``step`` (torch's Adam keeps it as a tensor): KeyError 'step'. A missing entry is skipped here, as
      megatron-core skips entries that are not tensors;
    - it gives every parameter the *same* ``step`` tensor, which torch's Adam then increments once per parameter
      at each step (bias corrections as if thousands of steps had run): each parameter gets its own copy.
    """
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        return original(self, model_param, {"step": None, **tensors})

    cls._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        cls._set_main_param_and_optimizer_states = original
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, cls):
            for param_state in inner.optimizer.state.values():
                if isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = param_state["step"].clone()


@contextmanager
def _reading(path: Path):
    """DCP's error for data it cannot read (a raw multi-rank traceback) as one line naming the checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        raise unreadable_checkpoint_error(path, exc) from None


def _optimizer_kind_problem(cfg, path: Path, common: dict[str, Any]) -> str | None:
    """Why this run cannot load the optimizer state of ``path``: it was saved by the other kind of optimizer (the
    distributed optimizer's per-parameter shards and the regular optimizer's state hold different entries)."""
    if not cfg.checkpoint.load_optim or "optimizer" not in set(common.get("saved_entries", ())):
        return None
    saved = (_saved_run_config(path).get("optimizer") or {}).get("use_distributed_optimizer")
    ours = bool(cfg.optimizer.use_distributed_optimizer)
    if not isinstance(saved, bool) or saved == ours:
        return None
    return (f"cannot resume the optimizer state of {path}: it was saved with optimizer.use_distributed_optimizer="
            f"{str(saved).lower()} and this run sets {str(ours).lower()}; resume with the checkpoint's setting "
            f"(optimizer.use_distributed_optimizer={str(saved).lower()} ddp.use_distributed_optimizer="
            f"{str(saved).lower()}), or set checkpoint.load_optim=false to go on with the weights, the schedule and a "
            "fresh optimizer state")


def check_resumable(path: Path, cfg) -> TrainState:
    """The counters saved in the checkpoint to resume (read before a model is built: the datasets are sized by
    them). Refuses a checkpoint in ``checkpoint.load`` that holds weights without a training state (what
    ``bridge-convert import`` / ``AutoBridge.import_ckpt`` write): there is no run to resume in it; and optimizer
    state that the run's kind of optimizer cannot load."""
    from megatron.core import dist_checkpointing

    load = cfg.checkpoint.load

    with _reading(path):
        common = dist_checkpointing.load_common_state_dict(str(path))
    if "train_state" not in common:
        raise CheckpointError(
            f"checkpoint.load={load}{'' if Path(load) == path else f' ({path})'} holds model weights but no training "
            "state (a converted checkpoint, as bridge-convert import writes): there is no run to resume in it; to start "
            "training from its weights set "
            f"checkpoint.pretrained_checkpoint={path.parent if (path.parent / TRACKER_FILE).exists() else path} and "
            "point checkpoint.load / checkpoint.save at this run's own directory")
    problem = _optimizer_kind_problem(cfg, path, common)
    if problem:
        raise CheckpointError(problem)
    return TrainState.from_dict(common["train_state"])


def load_training_checkpoint(run, path: Path) -> TrainState:
    """Restore everything :func:`save_training_checkpoint` wrote; returns the saved counters.

    The model loads at any TP/PP layout; optimizer state loads when ``checkpoint.load_optim`` (the distributed
    optimizer's format reshards too); RNG states load when ``checkpoint.load_rng`` and the world size is the same.
    """
    from megatron.core import dist_checkpointing

    cfg, state = run.cfg, run.parallel
    with _reading(path):
        common = dist_checkpointing.load_common_state_dict(str(path))
    saved = TrainState.from_dict(common["train_state"])
    model_state = _model_state(run)
    request: dict[str, Any] = {}
    entries = set(common.get("saved_entries", ()))
    if cfg.checkpoint.load_optim and "optimizer" in entries:
        _materialize_optimizer_state(run.optimizer)
        request["optimizer"] = run.optimizer.sharded_state_dict(model_state, is_loading=True,
                                                                metadata=_OPTIMIZER_METADATA)
    load_rng = cfg.checkpoint.load_rng and saved.world_size == state.world_size and "rng_state" in entries
    if cfg.checkpoint.load_rng and "rng_state" not in entries:
        logger.warning("not restoring RNG states: the checkpoint was saved without them (checkpoint.save_rng=false)")
    elif cfg.checkpoint.load_rng and not load_rng:
        logger.warning("not restoring RNG states: the checkpoint was saved by %d ranks, this run has %d",
                       saved.world_size, state.world_size)
    if load_rng:
        request["rng_state"] = _rng_sharded_object(state, None)
    adapters = adapter_only_checkpoints(cfg)
    differences = _peft_differences(cfg.peft, path) if adapters else []
    try:
        with _reading(path):
            loaded = load_model_state(run.model, path, extra_state=request, model_state=model_state,
                                      strict=not adapters, adapters=adapters)
    except CheckpointMismatchError as exc:
        if not differences:
            raise
        raise CheckpointMismatchError(f"cannot resume from {path} with this cfg.peft: {'; '.join(differences)}; "
                                      "resume with the checkpoint's PEFT settings, or save this run into another "
                                      "checkpoint.save directory") from exc
    if differences:
        logger.warning("resuming from %s with a PEFT setting other than the checkpoint's (%s): the config's values "
                       "apply from here on", path, "; ".join(differences))
    saved_config = _saved_run_config(path)
    base = _saved_pretrained_checkpoint(saved_config) if adapters else None
    same = _same_base(run, path) if adapters else None
    if not _agree(same is not False, state.device):
        raise CheckpointError(f"cannot resume the adapters of {path}: the base model's weights here "
                              f"(checkpoint.pretrained_checkpoint={cfg.checkpoint.pretrained_checkpoint}) are not the "
                              f"ones they were trained on ({base or 'the run recorded no path'}; the checkpoint "
                              "records a fingerprint of them); point checkpoint.pretrained_checkpoint at that base, "
                              "or save this run into another checkpoint.save directory to start new adapters")
    if same is None and base and cfg.checkpoint.pretrained_checkpoint and \
            Path(base).resolve() != Path(cfg.checkpoint.pretrained_checkpoint).resolve():
        logger.warning("resuming the adapters of %s onto checkpoint.pretrained_checkpoint=%s, but they were trained "
                       "on %s: nothing checks that the two hold the same weights (an adapter-only checkpoint keeps "
                       "no base, and this one records no fingerprint of it); point "
                       "checkpoint.pretrained_checkpoint at %s to continue on the base they were trained on", path,
                       cfg.checkpoint.pretrained_checkpoint, base, base)
    data = _data_differences(cfg, saved_config)
    if data and state.rank == 0:
        root = path.parent if (path.parent / TRACKER_FILE).exists() else path
        logger.warning("resuming from %s, which a run on other data saved (%s): this run goes on from that run's "
                       "iteration %d, optimizer and schedule, and skips the first %d samples of its own data; to start "
                       "a new run from those weights instead, set checkpoint.pretrained_checkpoint=%s and point "
                       "checkpoint.save / checkpoint.load (bridge-run: --dir) at a new directory", path,
                       "; ".join(data), saved.iteration, saved.consumed_train_samples, root)
    sched = run.scheduler
    checkpoint_schedule = sched.use_checkpoint_opt_param_scheduler and not sched.override_opt_param_scheduler
    line = describe_schedule(sched, common["opt_param_scheduler"], train_iters=cfg.train.train_iters,
                             resumed_iteration=saved.iteration)
    if "optimizer" in request:
        reconcile_param_groups(run.optimizer, loaded["optimizer"], checkpoint_schedule=checkpoint_schedule)
        with _torch_adam_step_fixes(run.optimizer):
            run.optimizer.load_state_dict(loaded["optimizer"])
    else:
        # Mixed precision keeps fp32 main weights that the step copies back into the model: without the saved
        # ones they must start from the weights just loaded, or the first step restores the pre-load weights.
        run.optimizer.reload_model_params()
        if checkpoint_schedule:  # fresh optimizer groups carry this config's rates: give them the checkpoint's
            old = common["opt_param_scheduler"]
            for group in run.optimizer.param_groups:
                for key in ("max_lr", "min_lr"):
                    if group.get(key) == getattr(sched, key) and key in old:
                        group[key] = old[key]
    sched.load_state_dict(common["opt_param_scheduler"])
    if state.rank == 0:
        print(line, flush=True)
    if load_rng:
        _set_rng_state(loaded["rng_state"], state)
    return saved
