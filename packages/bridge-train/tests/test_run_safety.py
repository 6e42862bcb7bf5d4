"""Never lose a run: resume without a tracker or from a damaged checkpoint, no overwritten iterations, saves that
wait out a non-finite streak, unwritable / full save disks in one line, a new LR schedule on resume, and what
one run returns (the model, exported in the same process) and logs (the parameter norm, gc / empty_cache calls).

One 4-iteration run (checkpoints at 2 and 4) is shared by the module; each test copies its checkpoints.
"""

from __future__ import annotations

import errno
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from bridge_train import CheckpointError, pretrain

BASE = {"train.train_iters": 4, "checkpoint.save_interval": 2, "train.eval_interval": 2, "train.eval_iters": 1,
        "train.manual_gc": True, "train.manual_gc_interval": 0, "train.manual_gc_eval": True,
        "train.empty_unused_memory_level": 2, "logger.log_params_norm": True}


class _CountingGC:
    def __init__(self) -> None:
        self.calls = {"collect": 0, "disable": 0, "enable": 0}

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls[name] += 1
        return record


@pytest.fixture(scope="module")
def base(tiny_llama, tmp_path_factory):
    """The shared run: its directory, result, TensorBoard dir and the loop's gc / empty_cache calls."""
    from train_helpers import make_run_config

    import bridge_train.loop as loop

    root = tmp_path_factory.mktemp("base")
    fake_gc = _CountingGC()
    cache_calls = []
    real_empty = torch.cuda.empty_cache

    def empty_cache():
        if sys._getframe(1).f_code.co_filename == loop.__file__:
            cache_calls.append(1)
        real_empty()

    cfg = make_run_config(tiny_llama, **BASE, **{"checkpoint.save": str(root / "ckpt"),
                                                  "logger.tensorboard_dir": str(root / "tb")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "gc", fake_gc)
        mp.setattr(torch.cuda, "empty_cache", empty_cache)
        result = pretrain(cfg)
    return {"root": root, "ckpt": root / "ckpt", "result": result, "gc": fake_gc.calls,
            "empty_cache": len(cache_calls)}


def _copy(base, tmp_path) -> Path:
    return Path(shutil.copytree(base["ckpt"], tmp_path / "ckpt"))


def _forbid_model_build(monkeypatch, cfg) -> None:
    """Make building ``cfg``'s model fail the test: what is refused must be refused before that."""
    def no_build(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(type(cfg.model), "provide_distributed_model", no_build)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_gc_and_empty_cache_follow_the_documented_settings(base):
    # manual_gc_interval=0: collect at each checkpoint (2, 4); manual_gc_eval: before and after each evaluation
    # (2, 4); empty_unused_memory_level=2: after each of the 4 steps and after each of the 2 evaluations.
    assert base["gc"] == {"collect": 2 + 2 * 2, "disable": 1, "enable": 1}
    assert base["empty_cache"] == 4 + 2


def test_pretrain_returns_the_model_for_an_export_in_the_same_process(base, tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from bridge_convert import AutoBridge

    result = base["result"]
    assert isinstance(result, list) and len(result) == 4 and result.losses == list(result)
    assert result.state.iteration == 4 and result.exit_reason is None
    result.bridge.save_hf_pretrained(result.model, tmp_path / "hf")
    # The independent path: the checkpoint written at iteration 4, exported by bridge-convert.
    AutoBridge.export_ckpt(base["ckpt"], tmp_path / "from-ckpt")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "from-ckpt").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.1.mlp.up_proj.weight"], start["model.layers.1.mlp.up_proj.weight"])


def test_params_norm_is_logged_and_matches_the_exported_weights(base, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    from bridge_convert import AutoBridge

    events = EventAccumulator(str(base["root"] / "tb"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/params norm")}
    AutoBridge.export_ckpt(base["ckpt"], tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    expected = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model.parameters()))  # tied weights counted once
    assert logged[4] == pytest.approx(expected, rel=1e-6)


def test_missing_tracker_resumes_from_the_newest_complete_checkpoint(base, run_config, tmp_path, capsys):
    ckpt = _copy(base, tmp_path)
    (ckpt / "latest_checkpointed_iteration.txt").unlink()
    before = {name: _snapshot(ckpt / name) for name in ("iter_0000002", "iter_0000004")}
    resumed = pretrain(run_config(**{**BASE, "train.train_iters": 6, "checkpoint.save": str(ckpt),
                                     "checkpoint.load": str(ckpt)}))
    assert len(resumed) == 2  # iterations 5 and 6, not a fresh start
    assert "has no latest_checkpointed_iteration.txt: resuming from the newest complete checkpoint iter_0000004" \
        in capsys.readouterr().out
    assert {name: _snapshot(ckpt / name) for name in before} == before
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_a_crash_between_the_rename_and_the_tracker_update_resumes_from_the_renamed_checkpoint(
        base, run_config, tmp_path, capsys):
    """iter_0000004 is whole but the tracker still names 2 (the process died between the two renames): resuming
    from 2 trained 3..4 and then refused to save iteration 4 over the directory, on every relaunch."""
    ckpt = _copy(base, tmp_path)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2\n")
    before = _snapshot(ckpt / "iter_0000004")
    resumed = pretrain(run_config(**{**BASE, "train.train_iters": 6, "checkpoint.save": str(ckpt),
                                     "checkpoint.load": str(ckpt)}))
    assert len(resumed) == 2  # iterations 5 and 6
    assert "names iteration 2 but iter_0000004 is complete and newer" in capsys.readouterr().out
    assert _snapshot(ckpt / "iter_0000004") == before
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_a_save_into_an_existing_iteration_directory_is_refused(base, run_config, tmp_path):
    ckpt = _copy(base, tmp_path)
    before = _snapshot(ckpt / "iter_0000004")
    cfg = run_config(**{**BASE, "checkpoint.save": str(ckpt), "checkpoint.load": str(ckpt / "iter_0000002")})
    with pytest.raises(CheckpointError, match=r"refusing to save iteration 4: .*iter_0000004 exists already"):
        pretrain(cfg)
    assert _snapshot(ckpt / "iter_0000004") == before


@pytest.mark.parametrize("load", ["none", "another directory"])
def test_saving_into_another_runs_checkpoints_is_refused_before_any_model_is_built(base, run_config, tmp_path,
                                                                                   monkeypatch, load):
    """A run that does not resume from them trained from iteration 0 into them: it moved their tracker back,
    keep_last_n deleted them, and the save of iteration 2 was refused after training that far."""
    ckpt = _copy(base, tmp_path)
    before = _snapshot(ckpt)
    other = {} if load == "none" else {"checkpoint.load": str(base["ckpt"])}
    cfg = run_config(**{**BASE, **other, "checkpoint.save": str(ckpt), "checkpoint.keep_last_n": 1})

    _forbid_model_build(monkeypatch, cfg)
    with pytest.raises(CheckpointError, match=rf"checkpoint\.save={ckpt} holds 2 checkpoint\(s\) of another run "
                                              rf"\(newest iter_0000004\) and this run .*; to continue that run set "
                                              rf"checkpoint\.load={ckpt}, or save to an empty directory"):
        pretrain(cfg)
    assert _snapshot(ckpt) == before


def _truncate_shard(directory: Path) -> Path:
    shard = max(directory.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


def _garble(path: Path) -> None:
    path.write_bytes(b"\x00{garbled")


@pytest.mark.parametrize("damage", ["truncated shard", "missing .metadata", "garbled metadata.json",
                                    "garbled bridge.json", "overwritten shard"])
def test_a_damaged_newest_checkpoint_names_the_file_and_the_previous_one(base, run_config, tmp_path, damage):
    """The garbled JSON files and an overwritten shard (its size intact) raised a raw JSONDecodeError / DCP's
    multi-rank CheckpointException traceback."""
    ckpt = _copy(base, tmp_path)
    newest = ckpt / "iter_0000004"
    if damage == "truncated shard":
        bad = _truncate_shard(newest)
        expected = rf"{bad.name} is truncated"
    elif damage == "missing .metadata":
        (newest / ".metadata").unlink()
        expected = r"\.metadata is missing"
    elif damage == "overwritten shard":
        shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(torch.randint(0, 256, (shard.stat().st_size,), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(0)).numpy().tobytes())
        expected = rf"cannot read the checkpoint {newest} \(.*\): its files are damaged; resume from"
    else:
        name = damage.removeprefix("garbled ")
        _garble(newest / name)
        expected = rf"{name} is not valid JSON \(Expecting value"
    cfg = run_config(**{**BASE, "checkpoint.load": str(ckpt), "checkpoint.save": str(ckpt)})
    with pytest.raises(CheckpointError, match=expected + r".*checkpoint\.load=.*iter_0000002"):
        pretrain(cfg)


@pytest.mark.parametrize(("keep_last_n", "damage"), [(None, "truncated shard"), (1, "truncated shard"),
                                                     (None, "garbled bridge.json")])
def test_fallback_to_previous_resumes_exactly_from_it(base, run_config, tmp_path, capsys, keep_last_n, damage):
    """With keep_last_n, pruning keeps the checkpoint just saved: it deleted it (and the previous one) and kept
    ``iter_0000004.damaged``, which sorts after it, so nothing resumable was left. A garbled bridge.json did not
    fall back (a raw JSONDecodeError)."""
    ckpt = _copy(base, tmp_path)
    if damage == "truncated shard":
        _truncate_shard(ckpt / "iter_0000004")
    else:
        _garble(ckpt / "iter_0000004" / "bridge.json")
    resumed = pretrain(run_config(**{**BASE, "checkpoint.save": str(ckpt), "checkpoint.load": str(ckpt),
                                     "checkpoint.fallback_to_previous": True,
                                     **({"checkpoint.keep_last_n": keep_last_n} if keep_last_n else {})}))
    assert "falling back to the previous complete checkpoint iter_0000002" in capsys.readouterr().out
    assert list(resumed) == base["result"][2:]  # bitwise: the same floats as the uninterrupted run
    assert (ckpt / "iter_0000004.damaged").is_dir() and (ckpt / "iter_0000004" / "bridge.json").exists()
    kept = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert kept == (["iter_0000004", "iter_0000004.damaged"] if keep_last_n else
                    ["iter_0000002", "iter_0000004", "iter_0000004.damaged"])
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def _lr_spy(monkeypatch) -> list[float]:
    import bridge_train.loop as loop

    seen: list[float] = []
    real = loop.train_step

    def spy(run, forward_step, iteration):
        out = real(run, forward_step, iteration)
        seen.append(run.optimizer.param_groups[0]["lr"])
        seen.append(float(run.optimizer.chained_optimizers[0].optimizer.state_dict()["state"][0]["step"]))
        return out

    monkeypatch.setattr(loop, "train_step", spy)
    return seen


def test_resume_with_a_new_lr_and_length_follows_the_override(base, run_config, tmp_path, monkeypatch, capsys):
    ckpt = _copy(base, tmp_path)
    seen = _lr_spy(monkeypatch)
    pretrain(run_config(**{**BASE, "checkpoint.load": str(ckpt), "checkpoint.save": str(ckpt),
                           "train.train_iters": 6, "optimizer.lr": 1e-3, "scheduler.override_opt_param_scheduler": True,
                           "scheduler.use_checkpoint_opt_param_scheduler": False}))
    out = capsys.readouterr().out
    assert "learning-rate schedule: this run's config (scheduler.override_opt_param_scheduler)" in out
    assert "optimizer.lr 0.003 -> 0.001" in out
    # Cosine from 1e-3 to min_lr 3e-4 over iterations 3..6 (warmup 3), evaluated at steps 5 and 6.
    expected = [3e-4 + 0.5 * (1 + math.cos(math.pi * (n - 3) / 3)) * (1e-3 - 3e-4) for n in (5, 6)]
    assert seen[0::2] == pytest.approx(expected, rel=1e-9)
    assert [float(s) for s in seen[1::2]] == [5.0, 6.0]  # the Adam state (moments, step) came from the checkpoint


def test_resume_with_a_new_lr_keeps_the_checkpoint_schedule_and_warns(base, run_config, tmp_path, monkeypatch,
                                                                       capsys):
    ckpt = _copy(base, tmp_path)
    seen = _lr_spy(monkeypatch)
    pretrain(run_config(**{**BASE, "checkpoint.load": str(ckpt), "checkpoint.save": str(ckpt),
                           "train.train_iters": 6, "optimizer.lr": 1e-3}))
    out = capsys.readouterr().out
    assert "NOT using the config's optimizer.lr 0.001 (checkpoint: 0.003)" in out
    assert "iterations 5..6 run at the minimum learning rate 0.0003" in out
    assert seen[0::2] == pytest.approx([3e-4, 3e-4], rel=1e-12)
    assert [float(s) for s in seen[1::2]] == [5.0, 6.0]


def test_saves_wait_for_a_finite_step_under_the_skip_policy(run_config, tmp_path, monkeypatch, capsys):
    import bridge_train.forward_step as fs

    real = fs.masked_next_token_loss
    calls = {"n": 0}

    def poisoned(loss_mask, per_token_loss):
        calls["n"] += 1
        if 8 < calls["n"] <= 12:  # 4 micro-batches per iteration: iteration 3 is non-finite
            per_token_loss = per_token_loss * float("nan")
        return real(loss_mask, per_token_loss)

    monkeypatch.setattr(fs, "masked_next_token_loss", poisoned)
    ckpt = tmp_path / "ckpt"
    losses = pretrain(run_config(**{"train.train_iters": 5, "checkpoint.save": str(ckpt),
                                    "checkpoint.save_interval": 3, "robustness.nan_policy": "skip"}))
    assert [math.isnan(x) for x in losses] == [False, False, True, False, False]
    assert "checkpoint at iteration 3 postponed" in capsys.readouterr().out
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000005"]


def test_an_unwritable_save_directory_fails_before_any_model_is_built(run_config, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    cfg = run_config(**{"checkpoint.save": str(tmp_path / "a-file" / "ckpt")})

    _forbid_model_build(monkeypatch, cfg)
    with pytest.raises(CheckpointError, match=r"checkpoint\.save=.*a-file/ckpt is not writable \(Not a directory\)"):
        pretrain(cfg)


def test_save_hf_that_cannot_be_done_fails_before_any_model_is_built(run_config, tiny_llama, monkeypatch):
    """Checkpoints inside the HF directory the model came from: the first save's HF export (after training) was
    refused by bridge-convert's output check, so the run crashed at its first checkpoint."""
    cfg = run_config(**{"checkpoint.save": f"{tiny_llama}/runs/ckpt", "checkpoint.save_hf": True})

    _forbid_model_build(monkeypatch, cfg)
    with pytest.raises(CheckpointError, match=r"checkpoint\.save=.*runs/ckpt is inside the HF directory .* the "
                                              r"model was loaded from"):
        pretrain(cfg)
    assert not (Path(tiny_llama) / "runs").exists()  # refused before anything was written


def test_a_full_disk_during_a_save_is_one_line_with_the_path(run_config, tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", full)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckpointError) as info:
        pretrain(run_config(**{"train.train_iters": 2, "scheduler.lr_warmup_iters": 1, "checkpoint.save": str(ckpt)}))
    message = str(info.value)
    assert "\n" not in message and "no space left on the device" in message
    assert f"{ckpt / 'iter_0000002.tmp'} (needs about " in message and "MiB free" in message
    assert not (ckpt / "iter_0000002.tmp").exists() and not (ckpt / "latest_checkpointed_iteration.txt").exists()


def test_keep_last_n_never_prunes_the_checkpoint_just_saved(base, run_config, tmp_path):
    """Resumed from an earlier checkpoint of a directory that holds later ones, a save kept the later ones (newest by
    number) and deleted the checkpoint it had just written, which the tracker names: nothing left to resume."""
    ckpt = _copy(base, tmp_path)
    pretrain(run_config(**{**BASE, "checkpoint.load": str(ckpt / "iter_0000002"), "checkpoint.save": str(ckpt),
                           "checkpoint.save_interval": 3, "checkpoint.keep_last_n": 1, "train.exit_interval": 3}))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["iter_0000003", "iter_0000004"]


def test_exit_duration_counts_from_the_start_of_setup(run_config, monkeypatch):
    """The budget started after the model was built and the checkpoints loaded: a setup that took longer than the
    whole budget still trained every iteration."""
    import time

    import bridge_train.setup as setup

    real = setup.build_run_tokenizer

    def slow(cfg):  # a slow setup (a large model, a checkpoint read from a network file system)
        time.sleep(1.5)
        return real(cfg)

    monkeypatch.setattr(setup, "build_run_tokenizer", slow)
    result = pretrain(run_config(**{"train.train_iters": 4, "train.exit_duration_in_mins": 1 / 60}))
    assert result.exit_reason == "exit_duration" and len(result) == 1


def test_iteration_time_leaves_out_evaluation_and_saves(run_config, monkeypatch, tmp_path):
    """The time of an evaluation or a save was charged to the next iteration (its tokens/s, TFLOP/s, MFU too)."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import bridge_train.loop as loop

    real_eval, real_save = loop.evaluate, loop.save_training_checkpoint

    def slow_eval(*args, **kwargs):
        time.sleep(0.6)
        return real_eval(*args, **kwargs)

    def slow_save(*args, **kwargs):
        time.sleep(0.6)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", slow_eval)
    monkeypatch.setattr(loop, "save_training_checkpoint", slow_save)
    pretrain(run_config(**{"train.train_iters": 4, "train.eval_interval": 1, "train.eval_iters": 1,
                           "checkpoint.save": str(tmp_path / "ckpt"), "checkpoint.save_interval": 1,
                           "logger.log_interval": 1, "logger.tensorboard_dir": str(tmp_path / "tb")}))
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    seconds = [e.value for e in events.Scalars("train/iteration time (s)")]
    assert len(seconds) == 4 and max(seconds[1:]) < 0.5, seconds  # each evaluation + save takes 1.2 s


def test_resuming_a_checkpoint_saved_without_rng_says_so(run_config, tmp_path, caplog):
    """The warning said the checkpoint had been saved by another number of ranks (1 ranks, this run has 1)."""
    ckpt = str(tmp_path / "ckpt")
    pretrain(run_config(**{"train.train_iters": 4, "checkpoint.save": ckpt, "checkpoint.save_rng": False}))
    with caplog.at_level("WARNING", logger="bridge"):
        pretrain(run_config(**{"train.train_iters": 5, "checkpoint.save": ckpt, "checkpoint.load": ckpt}))
    assert "not restoring RNG states: the checkpoint was saved without them (checkpoint.save_rng=false)" in caplog.text
    assert "saved by 1 ranks" not in caplog.text


def test_resuming_with_the_other_kind_of_optimizer_is_refused_before_any_model_is_built(base, run_config, tmp_path,
                                                                                      monkeypatch):
    """The distributed optimizer's state holds other entries than the regular optimizer's: loading one into the
    other failed after the model was built, in megatron-core's sharded-state matching, naming no setting."""
    ckpt = _copy(base, tmp_path)  # saved with the regular optimizer
    before = _snapshot(ckpt)
    other = {**BASE, "train.train_iters": 6, "checkpoint.save": str(ckpt), "checkpoint.load": str(ckpt),
             "optimizer.use_distributed_optimizer": True, "ddp.use_distributed_optimizer": True}
    cfg = run_config(**other)
    _forbid_model_build(monkeypatch, cfg)
    with pytest.raises(CheckpointError, match=r"saved with optimizer\.use_distributed_optimizer=false and this run "
                                              r"sets true; .*or set checkpoint\.load_optim=false"):
        pretrain(cfg)
    assert _snapshot(ckpt) == before
    monkeypatch.undo()
    resumed = pretrain(run_config(**other, **{"checkpoint.load_optim": False}))
    assert len(resumed) == 2  # iterations 5 and 6 from the saved weights, with a fresh optimizer state
