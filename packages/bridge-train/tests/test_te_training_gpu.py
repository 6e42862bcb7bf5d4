"""Training with the Transformer Engine spec on one GPU (`-m gpu`, TE importable): bf16 and every FP8 recipe of
this machine's generation, against the native spec from the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from bridge_convert.specs import te_available
from bridge_convert.testing import run_multiprocess, save_tiny_hf_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not te_available(), reason="Transformer Engine is not importable here")]

ITERS = 30
# FP8 GEMMs need dimensions in multiples of 16 (blockwise scaling: 128-element blocks), so a model larger than the
# 64-wide tiny one: 4 layers (FP8 current scaling keeps the first and last in bf16), hidden 256, FFN 512, 4 heads of 64, 2 KV groups, micro-batch 2 x seq 128 tokens.
SHAPE = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=512)
FP8_RECIPES = ["bf16_with_fp8_current_scaling_mixed", "bf16_with_fp8_delayed_scaling_mixed",
               "bf16_with_fp8_subchannel_scaling_mixed"]


@pytest.fixture(scope="module")
def te_llama(tmp_path_factory) -> str:
    return save_tiny_hf_checkpoint(tmp_path_factory.mktemp("te-llama"), "llama", seed=5, max_shard_size="5MB",
                                   **SHAPE)


def _losses(hf_path: str, runs: dict[str, dict]) -> dict[str, list[float]]:
    from train_helpers import make_run_config

    from bridge_train import pretrain

    common = {"train.train_iters": ITERS, "dataset.seq_length": 128, "train.global_batch_size": 2,
              # the recipes' data-parallel setting (FP8 parameters are gathered by the distributed optimizer)
              "optimizer.use_distributed_optimizer": True, "ddp.use_distributed_optimizer": True,
              "ddp.overlap_grad_reduce": True, "ddp.overlap_param_gather": True,
              "optimizer.overlap_param_gather": True}
    return {name: list(pretrain(make_run_config(hf_path, **{**common, **changes}))) for name, changes in runs.items()}


def _learned(curve: list[float]) -> bool:
    """The mean loss of the last five iterations is clearly below that of the first five (per-batch noise ~0.1)."""
    return sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.1


def test_te_spec_trains_like_the_native_spec(te_llama):
    runs = {impl: {"model.transformer_impl": impl, "mixed_precision": "bf16_mixed"}
            for impl in ("native", "transformer_engine")}
    losses = run_multiprocess(_losses, 1, te_llama, runs)[0]
    native, te = losses["native"], losses["transformer_engine"]
    diff = max(abs(a - b) for a, b in zip(native, te))
    print(f"bf16_mixed, native vs TE spec: max |loss difference| over {ITERS} iterations = {diff:.3g}")
    # The same weights and data; bf16 GEMMs and attention kernels differ between the specs.
    assert abs(native[0] - te[0]) <= 2e-2, (native, te)
    assert diff <= 5e-2, (native, te)
    assert _learned(te), te


def test_fp8_recipes_train_close_to_bf16(te_llama):
    from bridge_train.config.mixed_precision import MIXED_PRECISION_RECIPES, quantization_support_problems

    recipes = [name for name in FP8_RECIPES if not quantization_support_problems(
        (mp := MIXED_PRECISION_RECIPES[name]()).fp8, mp.fp8_recipe, None, None, name)]
    if not recipes:
        pytest.skip("this GPU runs none of the FP8 recipes")
    # One process per recipe, as a real run has. On an H200 (TE 2.20.2), in one process after three current-scaling
    # runs, delayed scaling (FP8 parameters, overlapped gather, lr 3e-3) went NaN at iteration 2; delayed scaling first
    # in a fresh process trained (lr 3e-4 / 1e-3 overlapped, 3e-3 not overlapped). Not root-caused (tools/bench/RESULTS.md).
    losses = {}
    for r in ["bf16_mixed", *recipes]:
        losses.update(run_multiprocess(_losses, 1, te_llama,
                                       {r: {"model.transformer_impl": "transformer_engine", "mixed_precision": r}})[0])
    base = losses.pop("bf16_mixed")
    for recipe, curve in losses.items():
        assert all(math.isfinite(x) for x in curve), (recipe, curve)
        rel = max(abs(a - b) / b for a, b in zip(curve, base))
        print(f"{recipe}: max relative loss difference to bf16_mixed over {ITERS} iterations = {rel:.3g}")
        assert rel <= 0.05, (recipe, curve, base)
        assert _learned(curve), (recipe, curve)


@pytest.mark.xfail(strict=True, reason="delayed scaling after a current-scaling run in one process went NaN at "
                                       "iteration 2 on an H200 (TE 2.20.2; tools/bench/RESULTS.md, block C); "
                                       "remove this mark when it passes")
def test_fp8_recipes_one_after_another_in_one_process(te_llama):
    """The sequence of the failing probe: current scaling, then delayed scaling, in one process (a sweep or a
    notebook calling pretrain() twice). Every loss must be finite."""
    from bridge_train.config.mixed_precision import MIXED_PRECISION_RECIPES, quantization_support_problems

    sequence = ["bf16_with_fp8_current_scaling_mixed", "bf16_with_fp8_delayed_scaling_mixed"]
    if any(quantization_support_problems((mp := MIXED_PRECISION_RECIPES[r]()).fp8, mp.fp8_recipe, None, None, r)
           for r in sequence):
        pytest.skip("this GPU cannot run both FP8 recipes")
    runs = {r: {"model.transformer_impl": "transformer_engine", "mixed_precision": r} for r in sequence}
    losses = run_multiprocess(_losses, 1, te_llama, runs)[0]
    assert all(math.isfinite(x) for curve in losses.values() for x in curve), losses
