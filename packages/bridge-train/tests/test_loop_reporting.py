"""What one run reports: the learning rate each update used, the validation loss over every evaluated token, why
it stopped, fp16's loss-scaler skips, and the errors a user's forward step or a worker thread meet."""

from __future__ import annotations

import threading

import pytest
import torch

from bridge_train import pretrain
from bridge_train.forward_step import ForwardStepSignatureError, gpt_forward_step


def _logged(monkeypatch) -> list[tuple[int, dict]]:
    from bridge_train.metrics import MetricsLogger

    seen = []
    real = MetricsLogger.training

    def training(self, iteration, scalars):
        seen.append((iteration, dict(scalars)))
        return real(self, iteration, scalars)

    monkeypatch.setattr(MetricsLogger, "training", training)
    return seen


def test_the_logged_lr_is_the_one_the_update_used(run_config, monkeypatch):
    """The lr was read after the scheduler's step: iteration 1 of a warmup from 0 logged the rate of iteration 2."""
    seen, used = _logged(monkeypatch), []

    def forward_step(data_iterator, model):  # before the update: the rate it is about to apply
        used.append(run_optimizer[0].param_groups[0]["lr"])
        return gpt_forward_step(data_iterator, model)

    import bridge_train.setup as setup

    run_optimizer = []
    real_setup = setup.setup_run

    def setup_run(cfg, *, finetune):
        run = real_setup(cfg, finetune=finetune)
        run_optimizer.append(run.optimizer)
        return run

    monkeypatch.setattr("bridge_train.entrypoints.setup_run", setup_run)
    pretrain(run_config(**{"train.train_iters": 5, "train.global_batch_size": 2, "logger.log_interval": 1}),
             forward_step)
    assert [s["lr"] for _, s in seen] == used[:5] and used[0] == 0.0  # one micro-batch per iteration


def test_validation_loss_weighs_every_evaluated_token_alike(run_config, monkeypatch):
    """With per-token losses it was the mean of each global batch's token mean (Megatron-LM sums over the whole
    evaluation); here the second batch has 2 loss tokens per row, the first 31."""
    sums, evals = [], []
    calls = {"eval": 0}

    def forward_step(data_iterator, model):
        batch = dict(next(data_iterator))
        if not model.training:
            calls["eval"] += 1
            if calls["eval"] > 4:
                batch["loss_mask"] = batch["loss_mask"].clone()
                batch["loss_mask"][:, 2:] = 0
        output, loss_func = gpt_forward_step(iter([batch]), model)

        def recorded(out):
            result = loss_func(out)
            if not model.training:
                sums.append((float(result[0]), int(result[1])))
            return result
        return output, recorded

    from bridge_train.metrics import MetricsLogger

    real = MetricsLogger.evaluation
    monkeypatch.setattr(MetricsLogger, "evaluation",
                        lambda self, it, name, loss: (evals.append(loss), real(self, it, name, loss))[1])
    pretrain(run_config(**{"train.train_iters": 4, "train.eval_interval": 4, "train.eval_iters": 2,
                           "model.calculate_per_token_loss": True}), forward_step)
    assert len(sums) == 8 and sums[4][1] < sums[0][1]
    expected = sum(s for s, _ in sums) / sum(t for _, t in sums)
    assert evals == [pytest.approx(expected, rel=1e-12)]


def test_reaching_train_iters_on_an_exit_interval_is_no_early_exit(run_config):
    result = pretrain(run_config(**{"train.train_iters": 4, "train.exit_interval": 2}))
    assert len(result) == 2 and result.exit_reason == "exit_interval"
    result = pretrain(run_config(**{"train.train_iters": 4, "train.exit_interval": 4}))
    assert len(result) == 4 and result.exit_reason is None  # said "exit_interval"


def test_fp16_loss_scaler_skips_are_no_non_finite_streak(run_config):
    """The loss scaler starts at 2**32 and skips the first overflowing updates (megatron-core's normal fp16 start):
    they counted as non-finite skips, so every fp16 run stopped at iteration 11 (max_consecutive_skips=10)."""
    result = pretrain(run_config(**{"train.train_iters": 14, "mixed_precision": "fp16_mixed",
                                    "scheduler.lr_warmup_iters": 1}))
    assert len(result) == 14 and all(torch.isfinite(torch.tensor(result)))
    assert 10 <= result.state.skipped_iterations < 14  # the skips are still counted and logged


@pytest.mark.parametrize("floor", [{"mixed_precision.min_loss_scale": 2.0**31}, {"mixed_precision.loss_scale": 2.0**30}],
                         ids=["dynamic-scale-at-its-minimum", "static-scale"])
def test_fp16_overflows_at_the_smallest_loss_scale_are_a_streak(run_config, floor):
    """Skips the scaler cannot end (its scale at min_loss_scale, or a static one) went on for the whole run with
    no update; they are a non-finite streak, stopped at robustness.max_consecutive_skips (fp16 holds |x| <= 65504:
    every gradient scaled by 2**30 overflows)."""
    from bridge_train.loop import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"4 consecutive iterations skipped \(limit 3\) at iteration \d+: "
                                                 r"the fp16 gradients overflow at the smallest loss scale"):
        pretrain(run_config(**{"train.train_iters": 14, "mixed_precision": "fp16_mixed", **floor,
                               "robustness.max_consecutive_skips": 3, "scheduler.lr_warmup_iters": 1}))


def _with_z_loss(data_iterator, model, *, only_after: int = 0, calls=[0]):  # noqa: B006 (a call counter)
    """gpt_forward_step whose loss dict also reports ``z loss`` (twice the lm loss), from call ``only_after`` on."""
    output, loss_func = gpt_forward_step(data_iterator, model)
    calls[0] += 1
    extra = calls[0] > only_after

    def with_z(out):
        loss, *rest = loss_func(out)
        report = rest[-1]
        return (loss, *rest[:-1], {**report, "z loss": report["lm loss"] * 2} if extra else report)
    return output, with_z


def test_other_keys_of_the_loss_dict_are_logged(run_config, monkeypatch):
    """Only 'lm loss' was reduced and logged: an auxiliary loss a forward step reported went nowhere."""
    import functools

    seen = _logged(monkeypatch)
    result = pretrain(run_config(**{"train.train_iters": 4, "logger.log_interval": 1}),
                      functools.partial(_with_z_loss, calls=[0]))
    assert [s["z loss"] for _, s in seen] == pytest.approx([2 * loss for loss in result], rel=1e-12)
    with pytest.raises(ForwardStepSignatureError, match=r"must report the keys of the first iteration, \['lm loss'\]"
                                                        r", every time"):  # a key that comes and goes
        pretrain(run_config(**{"train.train_iters": 4}), functools.partial(_with_z_loss, only_after=1, calls=[0]))


def test_a_loss_func_without_the_lm_loss_key_is_named(run_config):
    def forward_step(data_iterator, model):
        output, loss_func = gpt_forward_step(data_iterator, model)

        def renamed(out):
            loss, *rest = loss_func(out)
            return (loss, *rest[:-1], {"loss": rest[-1]["lm loss"]})
        return output, renamed

    with pytest.raises(ForwardStepSignatureError, match=r"must report its loss under the key 'lm loss' .*got "
                                                        r"\['loss'\]"):
        pretrain(run_config(**{"train.train_iters": 4}), forward_step)


def test_a_run_in_a_worker_thread_trains_without_signal_handlers(run_config, caplog):
    """signal.signal raised 'signal only works in main thread' after the whole setup."""
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("result", pretrain(run_config(**{"train.train_iters": 4}))))
    worker.start()
    worker.join()
    assert len(out["result"]) == 4
    assert "not installing the exit-signal handlers" in caplog.text
