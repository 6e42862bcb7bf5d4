"""TP=2, PP=2 and DP=2 (two gloo processes) reproduce the single-process losses for the same global batch."""

from __future__ import annotations

import pytest
import torch

from bridge_convert.testing import run_multiprocess
from bridge_train import pretrain

ITERS = 6
LAYOUTS = {
    "tp2": {"model.tensor_model_parallel_size": 2},
    "pp2": {"model.pipeline_model_parallel_size": 2},
    "dp2": {"optimizer.use_distributed_optimizer": True, "ddp.use_distributed_optimizer": True},
    "dp2_ddp": {},
}


def _body(hf_path: str) -> dict[str, list[float]]:
    from conftest import make_run_config

    return {name: pretrain(make_run_config(hf_path, **{"train.train_iters": ITERS}, **layout))
            for name, layout in LAYOUTS.items()}


@pytest.mark.multiproc
def test_parallel_layouts_match_single_process(run_config, tiny_llama):
    reference = pretrain(run_config(**{"train.train_iters": ITERS}))
    ranks = run_multiprocess(_body, 2, tiny_llama)
    for name in LAYOUTS:
        for rank in ranks:  # every rank reports the same averaged loss
            torch.testing.assert_close(rank[name], reference, rtol=0, atol=1e-5, msg=f"{name}")
