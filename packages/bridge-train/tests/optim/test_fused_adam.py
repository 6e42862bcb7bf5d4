"""The fused mixed-precision Adam(W) kernel against torch's own optimizers, on CPU through Triton's interpreter.

The GPU tests (``test_gpu.py``) run the compiled kernel and megatron-core's optimizer with it.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_SCRIPT = textwrap.dedent("""
    import copy, torch
    from bridge_train.optim.fused_step import fused_adam_step

    def params(seed):
        g = torch.Generator().manual_seed(seed)
        # a partial kernel block, several blocks, a tensor that gets no gradient
        return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((3000,), (2, 2048 + 5), (7, 3))]

    def groups(ps):
        return [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.1},
                {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]

    for cls in (torch.optim.AdamW, torch.optim.Adam):
        ref_p, got_p = params(0), params(0)
        ref = cls(groups(ref_p), betas=(0.9, 0.95), eps=1e-8, foreach=False)
        got = cls(groups(got_p), betas=(0.9, 0.95), eps=1e-8)
        models = {p: torch.empty_like(p, dtype=torch.bfloat16) for p in got_p}
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            for a, b in zip(ref_p, got_p):
                grad = torch.randn(a.shape, generator=g)
                a.grad, b.grad = grad.clone(), grad.clone()
            if step == 1:  # a parameter without a gradient is skipped, as torch skips it
                ref_p[2].grad = got_p[2].grad = None
            scale = 0.3 if step == 2 else 1.0  # a clipped step: the kernel scales each gradient as it reads it
            if scale != 1.0:
                for a in ref_p:
                    if a.grad is not None:
                        a.grad.mul_(scale)
            ref.step()
            fused_adam_step(got, models, grad_scales={p: scale for p in got_p})
            for a, b in zip(ref_p, got_p):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(got.state[b]["exp_avg"], ref.state[a]["exp_avg"], rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(got.state[b]["exp_avg_sq"], ref.state[a]["exp_avg_sq"],
                                           rtol=1e-6, atol=1e-9)
                assert float(got.state[b]["step"]) == float(ref.state[a]["step"])
                # the model copy written in the same pass (the interpreter truncates to bf16: one-ulp tolerance)
                torch.testing.assert_close(models[b].float(), b.detach(), rtol=2 ** -7, atol=0)
        # the state is torch's: a torch optimizer loaded from it continues exactly as the reference
        cont = cls(groups(got_p), betas=(0.9, 0.95), eps=1e-8, foreach=False)
        cont.load_state_dict(copy.deepcopy(got.state_dict()))
        for a, b in zip(ref_p, got_p):
            a.grad = b.grad = torch.ones_like(a)
        ref.step(); cont.step()
        for a, b in zip(ref_p, got_p):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # what the kernel cannot do, it refuses
    p = torch.nn.Parameter(torch.randn(4, 4).t())
    p.grad = torch.randn(4, 4)
    try:
        fused_adam_step(torch.optim.AdamW([p]))
    except ValueError as e:
        assert "contiguous" in str(e)
    else:
        raise AssertionError("a non-contiguous param must be refused")
    print("ok")
""")


def test_fused_adam_matches_torch_adam_and_adamw_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
