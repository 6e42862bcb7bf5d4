"""The native spec's CUDA paths (SDPA flash/cuDNN, FlexAttention for packed rows, compiled RoPE and loss kernels,
liger's RMSNorm when it imports) against the local spec on the same GPU. Runs on the lent GPU machines only."""

import pytest
import torch
from _native_models import grads, pair
from megatron.core.packed_seq_params import PackedSeqParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

B, S, V = 2, 256, 128


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("overrides", [{}, {"qk_layernorm": True, "kv_channels": 32}, {"window_size": (31, 0)}],
                         ids=["llama", "qwen3", "sliding-window"])
def test_cuda_native_matches_local(runtime, dtype, overrides):
    local, native = (m.to(device="cuda", dtype=dtype) for m in pair(**overrides))
    ids = torch.randint(0, V, (B, S), device="cuda")
    pos = torch.arange(S, device="cuda").expand(B, S)
    mask = torch.ones(B, S, device="cuda")
    losses = []
    for model in (local, native):
        loss = model(ids, pos, None, labels=ids, loss_mask=mask)
        ((loss * mask).sum() / mask.sum()).backward()
        losses.append(loss.detach())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _rel(losses[1], losses[0]) < tol
    g_local, g_native = grads(local), grads(native)
    worst = max(_rel(g_native[k], g_local[k]) for k in g_local)
    assert worst < (1e-3 if dtype == torch.float32 else 5e-2), worst


def test_cuda_packed_rows_match_documents_alone(runtime):
    local, native = (m.cuda() for m in pair())
    lengths = [100, 60, 96]
    docs = [torch.randint(0, V, (1, n), device="cuda") for n in lengths]
    cu = torch.tensor([0, 100, 160, 256], dtype=torch.int32, device="cuda")
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=100, max_seqlen_kv=100)
    ids = torch.cat(docs, dim=1)
    packed = native(ids, torch.zeros_like(ids), None, packed_seq_params=params)
    alone = torch.cat([local(d, torch.arange(d.shape[1], device="cuda").unsqueeze(0), None) for d in docs], dim=1)
    assert _rel(packed, alone) < 1e-4
