"""The quickstart (1 and 2 processes, on a tiny HF checkpoint) and the custom-model example, on a CPU."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUICK = ["train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_interval=null", "mixed_precision=fp32",
         "model.seq_length=64", "dataset.seq_length=64", "scheduler.lr_warmup_iters=2", "logger.print_config=false",
         "logger.progress_bar=false", "logger.log_interval=5"]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> str:
    from bridge_convert.testing import save_tiny_hf_checkpoint

    return save_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "llama32", "llama32", seed=3)


def _hf_first_loss(hf_path: str) -> float:
    """transformers' loss on the first global batch the run reads (4 mock samples, 2 micro-batches of 2): the
    first iteration's loss when the HF weights were loaded."""
    from transformers import AutoModelForCausalLM

    from bridge_data import PretrainDataConfig, TokenizerConfig, build_tokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float64).eval()
    tokenizer = build_tokenizer(TokenizerConfig(tokenizer_type="null", vocab_size=model.config.vocab_size))
    train, _, _ = PretrainDataConfig(seq_length=64, mock=True).build(tokenizer, train_samples=40, valid_samples=None,
                                                                    test_samples=None)
    means = []
    with torch.no_grad():
        for start in (0, 2):
            batch = [train[i] for i in range(start, start + 2)]
            tokens = torch.stack([s["tokens"] for s in batch])
            labels = torch.stack([s["labels"] for s in batch])
            mask = torch.stack([s["loss_mask"] for s in batch]).double()
            logits = model(tokens).logits
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            means.append(float((losses * mask).sum() / mask.sum()))
    return sum(means) / len(means)


def test_quickstart_loads_the_checkpoint_and_trains_ten_iterations(tiny_hf, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    losses = _example("quickstart").main([tiny_hf, *QUICK])
    assert len(losses) == 10
    assert losses[0] == pytest.approx(_hf_first_loss(tiny_hf), abs=2e-4)  # the HF weights were loaded
    assert losses[-1] < losses[0]


@pytest.mark.multiproc
def test_quickstart_on_two_processes(tiny_hf):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", str(EXAMPLES / "quickstart.py"),
                           tiny_hf, *QUICK, "model.tensor_model_parallel_size=2",
                           "model.make_vocab_size_divisible_by=64"],  # no padded vocab rows at TP=2: same loss
                          capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = float(re.search(r"quickstart: 10 iterations, first loss ([0-9.]+)", proc.stdout).group(1))
    assert first == pytest.approx(_hf_first_loss(tiny_hf), abs=2e-4)


def test_custom_model_block_computes_squared_relu_and_trains(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    example = _example("custom_model")
    provider = example.build_config([]).model.replace(params_dtype=torch.float32)
    (model,) = provider.provide_distributed_model(wrap_with_ddp=False)
    mlps = [m for m in model.modules() if isinstance(m, example.SquaredReLUMLP)]
    assert len(mlps) == 2
    mlp = mlps[0]
    x = torch.randn(5, 3, 64)
    w1, w2 = mlp.linear_fc1.weight.double(), mlp.linear_fc2.weight.double()
    expected = torch.relu(x.double() @ w1.T).square() @ w2.T  # float64 reference of the block
    out, bias = mlp(x)
    assert bias is None
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)

    losses = example.main([])
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses  # the mock data is learnable


def test_pipeline_demo_replaces_only_its_own_workdir(tmp_path):
    """The demo removes an earlier run's outputs, never a directory it did not write (``--workdir ~`` must not
    wipe a home directory)."""
    demo = _example("pipeline_demo")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    (user / "hf").mkdir()
    with pytest.raises(SystemExit, match="is not empty"):
        demo._claim(user)
    assert (user / "notes.txt").read_text() == "keep" and (user / "hf").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        demo._claim(tmp_path / "file")
    ours = tmp_path / "ours"
    demo._claim(ours)  # new: created and marked
    (ours / "merged").mkdir()
    (ours / "merged" / "model.safetensors").write_text("old")
    (ours / "mine.txt").write_text("the user's")
    demo._claim(ours)  # an earlier run's: its outputs go, nothing else
    assert not (ours / "merged").exists() and (ours / "mine.txt").read_text() == "the user's"
    legacy = tmp_path / "legacy"  # written by the demo before it marked its workdir: only its entries
    for name in ("hf", "pretrain", "lora"):
        (legacy / name).mkdir(parents=True)
    (legacy / "hf" / "config.json").write_text("{}")
    demo._claim(legacy)
    assert sorted(p.name for p in legacy.iterdir()) == [".bridge-pipeline-demo"]
    (user / "pretrain").mkdir()  # the same names beside a file of the user's: refused
    with pytest.raises(SystemExit, match="is not empty"):
        demo._claim(user)
