"""bridge-train's finetune() with cfg.peft: frozen base, adapter-only optimizer / DDP / checkpoints, exact resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bridge_convert.testing import save_tiny_hf_checkpoint

SCRIPT = '''
import sys
sys.path.insert(0, {tests!r})
from test_finetune_peft import make_config
from bridge_train import finetune
import bridge_train.loop as loop

def main():
    ckpt, marker = sys.argv[1], sys.argv[2]
    cfg = make_config({hf!r}, ckpt, train_iters=100000)
    real_step = loop.train_step
    def step(run, fs, iteration):
        if iteration == 3:
            open(marker, "w").write("running")
        return real_step(run, fs, iteration)
    loop.train_step = step
    finetune(cfg)
    print("clean exit", flush=True)

if __name__ == "__main__":
    main()
'''


def make_config(hf_path: str, ckpt: str | None, *, train_iters: int, peft=None, **checkpoint):
    from bridge_convert import AutoBridge
    from bridge_data import PretrainDataConfig
    from bridge_peft import LoRA
    from bridge_train import (
        CheckpointConfig,
        ConfigContainer,
        LoggerConfig,
        OptimizerConfig,
        SchedulerConfig,
        TrainConfig,
    )

    provider = AutoBridge.from_hf_pretrained(hf_path).to_megatron_provider(load_weights=False)
    return ConfigContainer(
        model=provider,
        train=TrainConfig(train_iters=train_iters, micro_batch_size=2, global_batch_size=4),
        dataset=PretrainDataConfig(seq_length=32, mock=True, seed=3),
        optimizer=OptimizerConfig(lr=2e-2, min_lr=2e-3, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=1),
        checkpoint=CheckpointConfig(save=ckpt, load=ckpt, pretrained_checkpoint=hf_path, **checkpoint),
        logger=LoggerConfig(log_interval=1, print_config=False, progress_bar=False),
        peft=peft if peft is not None else LoRA(dim=8, alpha=16),
    )


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> str:
    return save_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", seed=4)


def _base_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model[0].module.named_parameters()
            if not getattr(p, "bridge_adapter", False)}


def test_lora_finetune_trains_adapters_only(tiny_hf, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from bridge_convert import AutoBridge
    from bridge_train import gpt_forward_step
    from bridge_train.loop import train
    from bridge_train.setup import setup_run

    run = setup_run(make_config(tiny_hf, str(tmp_path / "ckpt"), train_iters=15), finetune=True)
    adapter_ids = {id(p) for p in run.model[0].module.parameters() if getattr(p, "bridge_adapter", False)}
    optimized = [p for opt in run.optimizer.chained_optimizers for g in opt.optimizer.param_groups
                 for p in g["params"]]
    assert optimized and {id(p) for p in optimized} == adapter_ids  # no base parameter (nor a master copy)
    ddp_params = [p for buf in run.model[0].buffers for p in buf.params]
    assert {id(p) for p in ddp_params} == adapter_ids  # DDP's grad buffers hold adapters only
    before = _base_params(run.model)
    reference = AutoBridge.from_hf_pretrained(tiny_hf).to_megatron_model(load_weights=True)
    hf_base = {n: p for n, p in reference[0].named_parameters()}
    assert all(torch.equal(before[n], hf_base[n]) for n in before)  # the base is the pretrained checkpoint

    losses = train(run, gpt_forward_step)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    after = _base_params(run.model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)

    iteration = tmp_path / "ckpt" / "iter_0000015"
    keys = FileSystemReader(str(iteration)).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if not k.startswith(("optimizer", "rng_state"))]
    assert model_keys and all(".adapter." in k for k in model_keys), model_keys[:5]
    size = sum(f.stat().st_size for f in iteration.glob("*.distcp"))
    adapter_bytes = sum(p.numel() * p.element_size() for p in optimized)
    base_bytes = sum(t.numel() * t.element_size() for t in before.values())
    assert size < 3 * adapter_bytes + 64_000 and size < base_bytes / 2, (size, adapter_bytes, base_bytes)


def test_sigterm_then_resume_continues_bitwise(tiny_hf, tmp_path):
    """A run stopped by SIGTERM saves; resuming (base from the pretrained checkpoint, adapters and optimizer
    from the adapter-only checkpoint) gives the uninterrupted run's losses bit for bit."""
    from bridge_train import finetune

    ckpt, marker = tmp_path / "ckpt", tmp_path / "marker"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), hf=tiny_hf))
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(marker)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"training did not start:\n{proc.communicate()[0]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "clean exit" in out, out
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the stopped run
    try:
        resumed = finetune(make_config(tiny_hf, str(ckpt), train_iters=stopped + 3))
        straight = finetune(make_config(tiny_hf, None, train_iters=stopped + 3))
    finally:
        torch.set_num_threads(threads)
    assert len(resumed) == 3
    assert resumed == straight[-3:], (resumed, straight)
