"""The Triton SwiGLU kernels' arithmetic, on CPU through Triton's interpreter (the GPU test runs them compiled)."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from bridge_convert.native.swiglu import _SwiGLU, swiglu_into_consumer
    for width in (1000, 2048):  # a partial last column block, and exact blocks
        y0 = torch.randn(3, 5, 2 * width, dtype=torch.float32)
        grad = torch.randn(3, 5, width)
        ref_y = y0.clone().requires_grad_()
        gate, up = ref_y.chunk(2, dim=-1)
        (F.silu(gate) * up).backward(grad)
        y = y0.clone().requires_grad_()
        out = _SwiGLU.apply(y, True)
        torch.testing.assert_close(out, F.silu(y0[..., :width]) * y0[..., width:], rtol=1e-5, atol=1e-6)
        out.backward(grad, retain_graph=True)
        torch.testing.assert_close(y.grad, ref_y.grad, rtol=1e-5, atol=1e-6)
        try:
            out.backward(grad)
        except RuntimeError as e:
            assert "retain_graph" in str(e)
        else:
            raise AssertionError("a second backward through the in-place kernel must raise")
        # released SwiGLU output, refilled by the forward kernel into its own storage before fc2's backward
        fc2 = torch.nn.Linear(width, 4)
        y = y0.clone().requires_grad_()
        fc2(F.silu(y[..., :width]) * y[..., width:]).sum().backward()
        want = (y.grad.clone(), fc2.weight.grad.clone())
        y.grad = fc2.weight.grad = None
        swiglu_into_consumer(y * 1.0, fc2, triton=True, recompute_output=True).sum().backward()
        torch.testing.assert_close(fc2.weight.grad, want[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.grad, want[0], rtol=1e-5, atol=1e-6)
    print("ok")
""")


def test_swiglu_kernels_match_eager_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
