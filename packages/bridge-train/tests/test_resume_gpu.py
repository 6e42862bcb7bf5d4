"""Resuming on one GPU with the recipes' optimizer setting (`-m gpu`): the distributed optimizer with overlapped
gradient reduce and parameter all-gather, bf16. Without Transformer Engine the inner optimizer is torch's Adam
stepped by bridge-train's fused kernel; with TE importable it is TE's FusedAdam: both must resume the same run."""

from __future__ import annotations

import pytest
import torch

from bridge_convert.testing import run_multiprocess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ITERS = 6


def _body(hf_path: str, ckpt: str) -> tuple[list[float], list[float], str]:
    from megatron.core.optimizer import distrib_optimizer
    from train_helpers import make_run_config

    from bridge_train import pretrain

    torch.backends.cuda.matmul.allow_tf32 = False
    common = {"train.train_iters": ITERS, "mixed_precision": "bf16_mixed", "scheduler.lr_warmup_iters": 1,
              "optimizer.use_distributed_optimizer": True, "ddp.use_distributed_optimizer": True,
              "ddp.overlap_grad_reduce": True, "ddp.overlap_param_gather": True,
              "optimizer.overlap_param_gather": True}
    first = pretrain(make_run_config(hf_path, **common, **{"checkpoint.save": ckpt, "checkpoint.save_interval": 3}))
    resumed = pretrain(make_run_config(hf_path, **common, **{"checkpoint.load": f"{ckpt}/iter_0000003"}))
    inner = "TE / apex FusedAdam" if distrib_optimizer.HAVE_APEX_OR_TE else "torch Adam"
    return list(first), list(resumed), inner


def test_distributed_optimizer_resumes_the_same_run(tiny_llama, tmp_path):
    first, resumed, inner = run_multiprocess(_body, 1, tiny_llama, str(tmp_path / "ckpt"))[0]
    print(f"inner optimizer: {inner}; losses {first}; resumed {resumed}")
    assert first[-1] < first[0]
    torch.testing.assert_close(resumed, first[3:], rtol=0, atol=1e-5)
