"""Real-size recipes on one GPU, a few iterations each (``nox -s gpu``); each launches bridge-run in its own process,
as a user would. The longer acceptance runs (20 iterations) use the same commands with more iterations."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QUICK = ["train.train_iters=3", "train.eval_interval=null", "logger.log_interval=1", "logger.print_config=false",
         "logger.progress_bar=false", "scheduler.lr_warmup_iters=1"]


def _bridge_run(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "bridge-run"), *argv], capture_output=True,
                          text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_llama32_1b_pretrain_at_real_size_logs_throughput():
    out = _bridge_run("llama32_1b_pretrain", *QUICK, "train.global_batch_size=4")
    lines = [line for line in out.splitlines() if line.startswith("iteration ")]
    assert len(lines) == 3 and all("tokens/s" in line and "MFU" in line for line in lines), out[-2000:]
    assert re.search(r"llama32_1b_pretrain: trained 3 iterations", out)


def test_llama32_3b_sft_at_real_size():
    assert "llama32_3b_sft: trained 3 iterations" in _bridge_run("llama32_3b_sft", "--allow-random-init", *QUICK)


def test_llama3_8b_lora_at_real_size_with_random_weights():
    assert "llama3_8b_lora: trained 3 iterations" in _bridge_run("llama3_8b_lora", "--allow-random-init", *QUICK)
