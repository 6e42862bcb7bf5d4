"""Training on CUDA (lent GPU machines, `-m gpu`): DP=2 and TP=2 over NCCL against one GPU."""

from __future__ import annotations

import pytest
import torch

from bridge_convert.testing import run_multiprocess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

ITERS = 8
LAYOUTS = {"single": {}, "dp2": {}, "tp2": {"model.tensor_model_parallel_size": 2}}


def _body(hf_path: str, layouts: list[str], precision: str) -> dict[str, list[float]]:
    from train_helpers import make_run_config

    from bridge_train import pretrain

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {name: pretrain(make_run_config(hf_path, **{"train.train_iters": ITERS, "mixed_precision": precision},
                                           **LAYOUTS[name])) for name in layouts}


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("bf16_mixed", 2e-2)])
def test_dp2_and_tp2_match_one_gpu(tiny_llama, precision, tolerance):
    single = run_multiprocess(_body, 1, tiny_llama, ["single"], precision)[0]["single"]
    ranks = run_multiprocess(_body, 2, tiny_llama, ["dp2", "tp2"], precision)
    for name in ("dp2", "tp2"):
        diff = max(abs(a - b) for a, b in zip(ranks[0][name], single))
        print(f"{precision} {name}: max |loss - single GPU loss| over {ITERS} iterations = {diff:.3g}")
        assert diff <= tolerance, (name, ranks[0][name], single)


def _async_body(hf_path: str, ckpt: str) -> tuple[list[float], list[float], str]:
    from train_helpers import make_run_config

    from bridge_train import pretrain

    torch.backends.cuda.matmul.allow_tf32 = False
    first = pretrain(make_run_config(hf_path, **{"train.train_iters": ITERS, "checkpoint.save": ckpt,
                                                 "checkpoint.save_interval": 4, "checkpoint.async_save": True}))
    from pathlib import Path

    tracker = (Path(ckpt) / "latest_checkpointed_iteration.txt").read_text().strip()
    resumed = pretrain(make_run_config(hf_path, **{"train.train_iters": ITERS,
                                                   "checkpoint.load": f"{ckpt}/iter_0000004"}))
    return list(first), list(resumed), tracker


def test_async_save_on_two_gpus_resumes_the_same_run(tiny_llama, tmp_path):
    ranks = run_multiprocess(_async_body, 2, tiny_llama, str(tmp_path / "ckpt"))
    first, resumed, tracker = ranks[0]
    assert tracker == str(ITERS)
    torch.testing.assert_close(resumed, first[4:], rtol=0, atol=1e-5)
