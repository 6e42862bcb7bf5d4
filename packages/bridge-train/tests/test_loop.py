"""Single-process training on CPU: learning, logging, exact resume, NaN handling, early config errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bridge_data import PretrainDataConfig
from bridge_train import ConfigError, pretrain
from bridge_train.loop import NonFiniteLossError


def test_pretrain_loss_decreases_and_tensorboard_has_scalars(run_config, tmp_path):
    cfg = run_config(**{"logger.tensorboard_dir": str(tmp_path / "tb"), "train.eval_interval": 10,
                        "train.eval_iters": 2})
    losses = pretrain(cfg)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/lm loss", "train/lr", "train/grad norm", "train/tokens/s", "validation/lm loss"} <= tags
    logged = {e.step: e.value for e in events.Scalars("train/lm loss")}
    assert sorted(logged) == [5, 10, 15, 20, 25, 30]
    assert logged[30] == pytest.approx(losses[29], rel=1e-6)


def test_resume_continues_bitwise(run_config, tmp_path):
    straight = pretrain(run_config())
    first = pretrain(run_config(**{"checkpoint.save": str(tmp_path / "ckpt"), "train.exit_interval": 15}))
    assert len(first) == 15
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "15"
    assert (tmp_path / "ckpt" / "iter_0000015" / "run_config.yaml").exists()
    second = pretrain(run_config(**{"checkpoint.load": str(tmp_path / "ckpt")}))
    assert len(second) == 15
    assert first + second == straight  # bitwise: same floats


@pytest.mark.parametrize("distributed", [False, True], ids=["float16-optimizer", "distributed-optimizer"])
def test_resume_without_optimizer_state_keeps_the_loaded_weights(run_config, tmp_path, distributed):
    # bf16_mixed keeps fp32 main weights in the optimizer. Without the saved optimizer state they must start from
    # the loaded weights: the continuation then follows the uninterrupted run (only the Adam moments differ)
    # instead of falling back to the first iterations' losses (the weights the optimizer was built with).
    common = {"mixed_precision": "bf16_mixed", "optimizer.use_distributed_optimizer": distributed,
              "ddp.use_distributed_optimizer": distributed}
    straight = pretrain(run_config(**common))
    pretrain(run_config(**common, **{"checkpoint.save": str(tmp_path / "ckpt"), "train.exit_interval": 15}))
    second = pretrain(run_config(**common, **{"checkpoint.load": str(tmp_path / "ckpt"),
                                              "checkpoint.load_optim": False}))
    assert second[0] == straight[15]  # the same weights and batch before any step
    assert second != straight[15:]  # the negative control of the exact-resume test: fresh Adam moments differ
    assert straight[1] - straight[16] > 0.5, straight  # the trained weights are far from the initial ones
    assert max(abs(a - b) for a, b in zip(second[1:6], straight[16:21])) < 0.1, (second, straight)


def test_the_distributed_optimizer_prints_no_known_harmless_notice(run_config, caplog, monkeypatch):
    """An fp32 run with the distributed optimizer (recipes' setting): megatron-core's notices that say nothing a
    user can act on (the DDP layout, .grad of the fp32 shard views) are hidden by pretrain()'s filter."""
    import logging
    import warnings

    from bridge_convert.runtime import warnings_filter

    monkeypatch.setattr(warnings_filter, "_installed", False)  # installed by pretrain() as in a new process
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pretrain(run_config(**{"optimizer.use_distributed_optimizer": True, "ddp.use_distributed_optimizer": True,
                               "train.train_iters": 4}))
    shown = [str(w.message) for w in seen] + [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in shown if "full_param_layout" in m or "not a leaf Tensor" in m], shown


def test_resume_past_train_iters_says_nothing_is_left(run_config, tmp_path, capsys):
    pretrain(run_config(**{"train.train_iters": 6, "checkpoint.save": str(tmp_path / "ckpt")}))
    capsys.readouterr()
    assert pretrain(run_config(**{"train.train_iters": 4, "checkpoint.load": str(tmp_path / "ckpt")})) == []
    assert "nothing left to train: the checkpoint is at iteration 6 and train.train_iters is 4" in capsys.readouterr().out


def test_pretrain_starts_from_pretrained_checkpoint(run_config, tmp_path):
    # pretrain() with checkpoint.pretrained_checkpoint trains those weights (it ignored them unless
    # checkpoint.finetune was set): the same losses as a run whose provider was made from that checkpoint.
    from train_helpers import make_run_config

    from bridge_convert.testing import save_tiny_hf_checkpoint

    other = save_tiny_hf_checkpoint(tmp_path / "other", "llama", seed=9)
    common = {"train.train_iters": 5}
    own, from_other = pretrain(run_config(**common)), pretrain(make_run_config(other, **common))
    assert own != from_other  # the two checkpoints are told apart by the loss
    assert pretrain(run_config(**common, **{"checkpoint.pretrained_checkpoint": other})) == from_other


def test_finetune_without_weights_is_refused_before_building(run_config, tmp_path, capsys):
    from bridge_train import user_errors_exit

    cfg = run_config(**{"checkpoint.finetune": True, "checkpoint.load": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError, match="holds no checkpoint of this run to resume and "
                                                "checkpoint.pretrained_checkpoint is not set"):
        pretrain(cfg)
    # a user's mistake: a training script's main prints it as one line (no traceback) and exits with 1
    with pytest.raises(SystemExit) as info, user_errors_exit():
        pretrain(run_config(**{"checkpoint.load": str(tmp_path / "empty"),
                               "checkpoint.exit_on_missing_checkpoint": True}))
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: checkpoint.load=") and "exit_on_missing_checkpoint is set" in err[-1]


def test_a_checkpoint_load_with_nothing_to_resume_says_the_run_starts_fresh(run_config, tmp_path, capsys):
    """A mistyped checkpoint.load trained from iteration 0 without a word."""
    pretrain(run_config(**{"train.train_iters": 4, "checkpoint.load": str(tmp_path / "typo")}))
    assert (f"checkpoint.load={tmp_path / 'typo'} does not exist (yet): nothing to resume, this run starts at "
            "iteration 0" in capsys.readouterr().out)


@pytest.mark.parametrize("mistake", ["missing pretrained", "HF directory as checkpoint.load", "a file as checkpoint.load"])
def test_checkpoint_paths_that_cannot_be_meant_are_refused_before_building(run_config, tmp_path, monkeypatch,
                                                                            mistake):
    # refused by the config check (so by bridge-run --dry-run too)
    from bridge_convert.testing import save_tiny_hf_checkpoint

    if mistake == "missing pretrained":
        cfg = run_config(**{"checkpoint.pretrained_checkpoint": str(tmp_path / "nope")})
        error = ConfigError, r"checkpoint.pretrained_checkpoint=.*nope does not exist"
    elif mistake == "a file as checkpoint.load":  # found no checkpoint in it and trained from scratch, silently
        (tmp_path / "ckpt.pt").write_bytes(b"weights")
        cfg = run_config(**{"checkpoint.load": str(tmp_path / "ckpt.pt")})
        error = ConfigError, r"checkpoint\.load=.*ckpt\.pt is a file; point it at the checkpoint\.save directory"
    else:
        hf = save_tiny_hf_checkpoint(tmp_path / "hf", "llama", seed=3)
        cfg = run_config(**{"checkpoint.load": hf})
        error = ConfigError, (r"checkpoint.load=.*hf is an HF model directory \(config.json\), not a checkpoint of "
                             r"a run: to train from its weights set checkpoint.pretrained_checkpoint=")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the mistake was reported")

    monkeypatch.setattr(type(cfg.model), "provide_distributed_model", no_model)
    with pytest.raises(error[0], match=error[1]):
        pretrain(cfg)


def test_nan_loss_stops_with_the_iteration_named(run_config, monkeypatch):
    import bridge_train.forward_step as fs

    real = fs.masked_next_token_loss
    calls = {"n": 0}

    def poisoned(loss_mask, per_token_loss):
        calls["n"] += 1
        if calls["n"] > 4 * 3:  # 4 micro-batches per iteration: iteration 4 onwards
            per_token_loss = per_token_loss * float("nan")
        return real(loss_mask, per_token_loss)

    monkeypatch.setattr(fs, "masked_next_token_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="iteration 4: loss nan"):
        pretrain(run_config(**{"train.train_iters": 6}))


def test_nan_loss_is_skipped_under_skip_policy(run_config, monkeypatch):
    import bridge_train.forward_step as fs

    real = fs.masked_next_token_loss
    calls = {"n": 0}

    def poisoned(loss_mask, per_token_loss):
        calls["n"] += 1
        if 8 < calls["n"] <= 12:  # exactly iteration 3
            per_token_loss = per_token_loss * float("nan")
        return real(loss_mask, per_token_loss)

    monkeypatch.setattr(fs, "masked_next_token_loss", poisoned)
    losses = pretrain(run_config(**{"train.train_iters": 6, "robustness.nan_policy": "skip"}))
    assert math.isnan(losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)


@pytest.mark.parametrize("override,field", [
    ({"train.global_batch_size": 7}, "train.global_batch_size"),
    ({"model.tensor_model_parallel_size": 3}, "tensor_model_parallel_size"),
    ({"checkpoint.save_interval": 5}, "checkpoint.save"),
])
def test_invalid_config_fails_before_any_model_is_built(run_config, monkeypatch, override, field):
    cfg = run_config(**override)

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built for an invalid config")

    monkeypatch.setattr(type(cfg.model), "provide_distributed_model", no_build)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        pretrain(cfg)


def test_unknown_override_names_the_closest_key(run_config):
    with pytest.raises(ConfigError, match="train_iter.*train.train_iters"):
        run_config(**{"train.train_iter": 5})


def test_lr_follows_the_schedule(run_config):
    cfg = run_config(**{"train.train_iters": 6, "scheduler.lr_decay_style": "linear"})
    seen = []
    import bridge_train.loop as loop

    real = loop.train_step

    def spy(run, forward_step, iteration):
        out = real(run, forward_step, iteration)
        seen.append(run.optimizer.param_groups[0]["lr"])
        return out

    loop.train_step = spy
    try:
        pretrain(cfg)
    finally:
        loop.train_step = real
    # warmup 3 iterations to 3e-3, then linear decay to min_lr 3e-4 at iteration 6
    expected = [1e-3, 2e-3, 3e-3, 2.1e-3, 1.2e-3, 3e-4]
    assert seen == pytest.approx(expected, rel=1e-6)
    assert torch.get_default_dtype() == torch.float32


def test_profiler_writes_a_trace_for_the_window(run_config, tmp_path):
    pretrain(run_config(**{"train.train_iters": 4, "profiling.use_pytorch_profiler": True,
                           "profiling.profile_step_start": 2, "profiling.profile_step_end": 4,
                           "profiling.profile_dir": str(tmp_path / "prof")}))
    traces = list((tmp_path / "prof").glob("*.pt.trace.json*"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


class _OtherData(PretrainDataConfig):
    """Another kind of dataset config (as another recipe's would be)."""


def test_resuming_a_run_saved_on_other_data_says_so(run_config, tmp_path, caplog):
    # a checkpoint directory reused by a run on other data (another bridge-run recipe into the same --dir): the
    # resume goes on from that run's consumed samples, skipping as many of this run's, and says so
    ckpt = str(tmp_path / "ckpt")
    pretrain(run_config(**{"checkpoint.save": ckpt, "train.train_iters": 4}))
    with caplog.at_level("WARNING", logger="bridge"):
        pretrain(run_config(**{"checkpoint.save": ckpt, "checkpoint.load": ckpt, "train.train_iters": 5}))
    assert "other data" not in caplog.text  # the same data: no warning
    caplog.clear()
    corpus = _indexed_corpus(tmp_path)
    with caplog.at_level("WARNING", logger="bridge"):
        pretrain(run_config(**{"checkpoint.load": ckpt, "train.train_iters": 6, "dataset.mock": False,
                               "dataset.paths": [corpus], "dataset.split": "90,10,0",
                               "dataset.cache_dir": str(tmp_path / "cache")}))
    assert (f"which a run on other data saved (dataset.mock: True (checkpoint) vs False (config); dataset.paths: [] "
            f"(checkpoint) vs {[corpus]!r} (config); dataset.split: '98,1,1' (checkpoint) vs '90,10,0' (config))"
            ) in caplog.text
    assert "goes on from that run's iteration 5, optimizer and schedule, and skips the first 40 samples" in caplog.text
    assert f"checkpoint.pretrained_checkpoint={ckpt} " in caplog.text
    caplog.clear()
    cfg = run_config(**{"checkpoint.load": ckpt, "train.train_iters": 7})
    cfg.dataset = _OtherData(**{f.name: getattr(cfg.dataset, f.name) for f in dataclasses.fields(cfg.dataset)})
    with caplog.at_level("WARNING", logger="bridge"):
        pretrain(cfg)
    assert "(dataset bridge_data.pretrain.PretrainDataConfig (checkpoint) vs " in caplog.text
    assert "_OtherData (config))" in caplog.text


def _indexed_corpus(root) -> str:
    """A small indexed dataset of token ids < 128 (the tiny model's vocabulary): 67 samples of 32 tokens per epoch,
    so a run of 10 x 8 samples spans two epochs of megatron-core's GPTDataset and one of 5 x 8 fits in one."""
    import random

    from bridge_data import PreprocessConfig, TokenizerConfig, preprocess
    from bridge_data.testing import write_jsonl

    rng = random.Random(0)
    rows = [{"text": " ".join(str(rng.randrange(127)) for _ in range(rng.randint(20, 80)))} for _ in range(40)]
    prefix = str(root / "corpus")
    preprocess(PreprocessConfig(inputs=[write_jsonl(root / "corpus.jsonl", rows)], output_prefix=prefix,
                                tokenizer=TokenizerConfig(tokenizer_type="null", vocab_size=128), progress=False))
    return prefix


def test_a_shorter_resumed_run_reads_the_samples_of_the_saved_one(run_config, tmp_path):
    # The saved run built its dataset for 10 x 8 samples (two epochs); the resume stops earlier (train_iters=5).
    # Its dataset was built for 5 x 8 samples: one epoch, which megatron-core's GPTDataset orders differently,
    # so iteration 5 read other samples than the saved run would have.
    data = {"dataset.mock": False, "dataset.paths": [_indexed_corpus(tmp_path)], "dataset.split": "100,0,0",
            "dataset.cache_dir": str(tmp_path / "cache")}
    straight = pretrain(run_config(**data, **{"train.train_iters": 10}))
    ckpt = str(tmp_path / "ckpt")
    first = pretrain(run_config(**data, **{"train.train_iters": 10, "train.exit_interval": 4, "checkpoint.save": ckpt}))
    second = pretrain(run_config(**data, **{"train.train_iters": 5, "checkpoint.load": ckpt}))
    assert len(first) == 4 and len(second) == 1
    assert first + second == straight[:5]  # bitwise


def test_a_shorter_resumed_run_evaluates_on_the_samples_of_the_saved_one(run_config, tmp_path):
    # The validation split (a tenth: about 7 samples per epoch) is sized by the evaluations of the run; a shorter
    # resume built it for fewer epochs, ordered differently, and its evaluation at iteration 6 read other samples.
    import bridge_train.loop as loop

    data = {"dataset.mock": False, "dataset.paths": [_indexed_corpus(tmp_path)], "dataset.split": "90,10,0",
            "dataset.cache_dir": str(tmp_path / "cache"), "train.eval_interval": 2, "train.eval_iters": 2}
    seen = []
    real = loop.evaluate

    def recording(run, forward_step):
        seen.append((run.train_state.iteration, real(run, forward_step)))
        return seen[-1][1]

    loop.evaluate = recording
    try:
        pretrain(run_config(**data, **{"train.train_iters": 10}))
        straight, seen[:] = dict(seen), []
        ckpt = str(tmp_path / "ckpt")
        pretrain(run_config(**data, **{"train.train_iters": 10, "train.exit_interval": 4, "checkpoint.save": ckpt}))
        pretrain(run_config(**data, **{"train.train_iters": 6, "checkpoint.load": ckpt}))
    finally:
        loop.evaluate = real
    resumed = dict(seen)
    assert sorted(resumed) == [2, 4, 6] and all(resumed[i] == straight[i] for i in (2, 4, 6)), (resumed, straight)
