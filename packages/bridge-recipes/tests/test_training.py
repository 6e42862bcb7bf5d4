"""Shrunk recipes train through bridge-run: every recipe once in this process, llama32_1b's four tasks also with
two gloo processes (TP=2 and DP=2), whose losses must equal the single-process ones."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from recipe_helpers import TINY_VOCAB, shrink

from bridge_convert.testing import run_multiprocess
from bridge_recipes.registry import RECIPES
from bridge_recipes.run import run_recipe

LAYOUTS = {"tp2": ["model.tensor_model_parallel_size=2"], "dp2": []}
TASKS = ("pretrain", "sft", "lora", "dora")


def _argv(name: str, *extra: str) -> list[str]:
    flags = ["--allow-random-init"] if RECIPES[name].is_finetune else []
    return [name, *flags, *shrink(name), *extra]


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_trains_two_iterations_on_one_process(name, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    losses = run_recipe(_argv(name))
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    # Random init: the first loss is near ln(vocab) (a uniform prediction), whatever the recipe.
    assert abs(losses[0] - math.log(TINY_VOCAB)) < 0.3, losses


def test_canonical_lora_trains(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    losses = run_recipe(_argv("llama32_1b_lora", "peft=canonical_lora", "peft.lora_B_init_method=normal"))
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses) and losses[1] != losses[0]


def _two_process_body(tasks: list[str]) -> dict[str, list[float]]:
    return {f"{task}/{layout}": run_recipe(_argv(f"llama32_1b_{task}", *extra))
            for task in tasks for layout, extra in LAYOUTS.items()}


@pytest.mark.multiproc
def test_llama32_1b_tasks_on_two_processes_match_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    reference = {task: run_recipe(_argv(f"llama32_1b_{task}")) for task in TASKS}
    ranks = run_multiprocess(_two_process_body, 2, list(TASKS))
    for key in ranks[0]:
        for rank in ranks:
            torch.testing.assert_close(rank[key], reference[key.split("/")[0]], rtol=0, atol=2e-5, msg=key)


@pytest.mark.multiproc
def test_torchrun_launches_the_console_script(tmp_path):
    """The documented launch: torchrun --nproc-per-node 2 $(which bridge-run) RECIPE ... (TP=2)."""
    bridge_run = os.path.join(os.path.dirname(sys.executable), "bridge-run")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", bridge_run,
           *_argv("llama32_1b_pretrain", "model.tensor_model_parallel_size=2"), "--dir", str(tmp_path / "run"),
           "checkpoint.save_interval=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama32_1b_pretrain: trained 2 iterations" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "iter_0000002").is_dir()


def test_an_exit_signal_saves_and_exits_128_plus_its_number(monkeypatch, tmp_path, capsys):
    """A run SIGTERM stopped (it saved) exited 0 like a finished one: a scheduler could not tell it was preempted."""
    import signal

    import bridge_train.loop as loop
    from bridge_recipes.run import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    real, steps = loop.train_step, []

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop's handler: it saves after this iteration
        return out

    monkeypatch.setattr(loop, "train_step", step)
    assert main([*_argv("llama32_1b_pretrain", "train.train_iters=6"), "--dir", str(tmp_path / "run")]) == 143
    assert "bridge-run: stopped by SIGTERM; resume with the same command" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_an_unwritable_run_directory_is_bad_input(tmp_path, capsys):
    """It was reported as a failure of the training run (exit 1, with the exception's class)."""
    from bridge_recipes.run import main

    (tmp_path / "a_file").write_text("x")
    assert main([*_argv("llama32_1b_pretrain"), "--dir", str(tmp_path / "a_file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bridge-run: error: checkpoint.save=") and "not writable" in err[0]
