"""Which memory layout does SDPA's output have for megatron's [s, b, heads, d] inputs (bf16, causal, GQA)?

If the output is physically [s, b, heads, d], the native spec's ``out.permute(2, 0, 1, 3).reshape(s, b, h)`` is a
view, and core attention's saved output and linear_proj's saved input share one buffer; otherwise that reshape
copies and both are kept for the backward. Run on a GPU: ``python tools/gpu/sdpa_layout_probe.py``.
"""

import torch
import torch.nn.functional as F

s, b, heads, groups, d = 4096, 8, 32, 8, 64
for backend in (None, "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
    q = torch.randn(s, b, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(s, b, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(s, b, groups, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ctx = torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)) if backend else None
    try:
        if ctx:
            ctx.__enter__()
        out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                             is_causal=True, enable_gqa=True)
        print(f"{backend or 'default'}: {type(out.grad_fn).__name__} strides {out.stride()} "
              f"[s,b,h,d]-contiguous {out.permute(2, 0, 1, 3).is_contiguous()}")
    except Exception as e:  # a backend that refuses these inputs
        print(f"{backend}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
