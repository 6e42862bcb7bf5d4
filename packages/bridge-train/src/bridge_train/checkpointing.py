"""Training checkpoints: bridge-convert's Megatron checkpoint format plus the state an exact resume needs.

One iteration directory holds (megatron-core dist-checkpointing, written to ``iter_*.tmp`` and renamed when
complete; the ``latest_checkpointed_iteration.txt`` tracker is replaced only after that):

- ``model`` / ``model0..``: the weights, in bridge-convert's format, so ``bridge-convert export`` reads them;
- ``optimizer``: megatron-core's optimizer state (``fully_reshardable`` for the distributed optimizer);
- ``rng_state``: every rank's Python / NumPy / torch / CUDA / model-parallel-tracker RNG states;
- common entries: ``opt_param_scheduler`` and ``train_state`` (iteration, consumed samples, ...);
- ``run_config.yaml``: the resolved config of the run.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bridge_convert.megatron_ckpt import (
    METADATA_FILE,
    TRACKER_FILE,
    load_model_state,
    resolve_checkpoint_dir,
    save_checkpoint,
    sharded_model_state,
)

__all__ = ["TrainState", "adapter_only_checkpoints", "find_resume_checkpoint", "load_training_checkpoint",
           "save_training_checkpoint"]

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


def save_training_checkpoint(run, train_state: TrainState) -> Path:
    """Save model, optimizer, scheduler, RNG, counters and the resolved config as ``train_state.iteration``.

    Every rank calls this. ``run`` is the :class:`bridge_train.setup.TrainingRun`.
    """
    cfg, state = run.cfg, run.parallel
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
    files = {RUN_CONFIG_FILE: cfg.to_yaml()}
    root = Path(cfg.checkpoint.save)
    if run.bridge is not None:
        metadata = run.bridge.checkpoint_metadata(run.model)
        assets = run.bridge.hf_path
    else:
        metadata, assets = {"architecture": None}, None
    if adapter_only_checkpoints(cfg):
        metadata = {**metadata, "peft": _peft_metadata(cfg.peft)}
    path = save_checkpoint(run.model, root, iteration=train_state.iteration, metadata=metadata,
                           extra_state=extra, hf_assets_from=assets, model_state=model_state, extra_files=files,
                           sharded_strategy=_save_strategy(run))
    if cfg.checkpoint.save_hf and run.bridge is not None:
        run.bridge.save_hf_pretrained(run.model, path / "hf")
    if state.rank == 0:
        _prune(root, keep=cfg.checkpoint.keep_last_n, current=train_state.iteration)
    return path


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


def _save_strategy(run):
    """torch_dist, with the writing of replicated tensors spread over the data-parallel ranks when asked."""
    if not run.cfg.checkpoint.fully_parallel_save or run.parallel.dp_size == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
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
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / METADATA_FILE).exists()
                      and not p.name.endswith(".tmp"))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(load_dir: str | None) -> Path | None:
    """The newest complete checkpoint under ``load_dir`` (via its tracker), or None when there is none yet."""
    if not load_dir:
        return None
    root = Path(load_dir)
    if not (root / TRACKER_FILE).exists() and not (root / METADATA_FILE).exists():
        return None
    return resolve_checkpoint_dir(root)


def load_training_checkpoint(run, path: Path) -> TrainState:
    """Restore everything :func:`save_training_checkpoint` wrote; returns the saved counters.

    The model loads at any TP/PP layout; optimizer state loads when ``checkpoint.load_optim`` (the distributed
    optimizer's format reshards too); RNG states load when ``checkpoint.load_rng`` and the world size is the same.
    """
    from megatron.core import dist_checkpointing

    cfg, state = run.cfg, run.parallel
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved = TrainState.from_dict(common["train_state"])
    model_state = _model_state(run)
    request: dict[str, Any] = {}
    entries = set(common.get("saved_entries", ()))
    if cfg.checkpoint.load_optim and "optimizer" in entries:
        request["optimizer"] = run.optimizer.sharded_state_dict(model_state, is_loading=True,
                                                                metadata=_OPTIMIZER_METADATA)
    load_rng = cfg.checkpoint.load_rng and saved.world_size == state.world_size and "rng_state" in entries
    if cfg.checkpoint.load_rng and not load_rng:
        logger.warning("not restoring RNG states: the checkpoint was saved by %d ranks, this run has %d",
                       saved.world_size, state.world_size)
    if load_rng:
        request["rng_state"] = _rng_sharded_object(state, None)
    loaded = load_model_state(run.model, path, extra_state=request, model_state=model_state,
                              strict=not adapter_only_checkpoints(cfg))
    if "optimizer" in request:
        run.optimizer.load_state_dict(loaded["optimizer"])
    run.scheduler.load_state_dict(common["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"], state)
    return saved
