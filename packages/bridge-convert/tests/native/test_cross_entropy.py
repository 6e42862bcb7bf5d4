"""The chunked fused output-projection + cross entropy equals megatron-core's vocab_parallel_cross_entropy."""

import pytest
import torch
from megatron.core import tensor_parallel

from bridge_convert.native import fused_linear_cross_entropy

S, B, H, V = 24, 3, 16, 96


def _inputs(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(V, H, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    return hidden, weight, labels, mask


def _reference(hidden, weight, labels):
    logits = hidden @ weight.t()  # [s, b, V], what ColumnParallelLinear returns
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())
    return loss.transpose(0, 1).contiguous()


def _grads(*tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


# Downstream reductions: masked mean (gradient = c x mask: computed in the forward pass), a per-sample mean
# (not proportional to the mask: recomputed in backward), and no loss_mask passed to the loss at all.
REDUCTIONS = {
    "masked-mean": (True, lambda loss, mask: (loss * mask).sum() / mask.sum()),
    "per-sample-mean": (True, lambda loss, mask: ((loss * mask).sum(1) / mask.sum(1)).mean()),
    "mask-not-passed": (False, lambda loss, mask: (loss * mask).sum()),
}


@pytest.mark.parametrize("chunk", [5, 7, 1000], ids=["chunk5", "chunk7-ragged", "one-chunk"])
@pytest.mark.parametrize("reduction", list(REDUCTIONS), ids=list(REDUCTIONS))
def test_loss_and_grads_equal_vocab_parallel_cross_entropy(runtime, chunk, reduction):
    pass_mask, reduce = REDUCTIONS[reduction]
    hidden, weight, labels, mask = _inputs()
    ref = _reference(hidden, weight, labels)
    reduce(ref, mask).backward()
    ref_grads = _grads(hidden, weight)
    loss = fused_linear_cross_entropy(hidden, weight, labels, loss_weights=mask if pass_mask else None,
                                      chunk_tokens=chunk)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    reduce(loss, mask).backward()
    for got, want in zip(_grads(hidden, weight), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_labels_outside_the_vocab_behave_like_megatron(runtime):
    hidden, weight, labels, _ = _inputs()
    labels[0, :4] = -100
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
    torch.testing.assert_close(loss, _reference(hidden, weight, labels), rtol=0, atol=1e-5)


def test_bf16_inputs_get_bf16_grads(runtime):
    """bf16 hidden states and weight: fp32 losses and bf16 gradients, against float64 on the same bf16 values.

    Tolerances from bf16's unit roundoff u = 2**-8 (8-bit significand). The logits are rounded to bf16 once (as
    megatron's bf16 output layer does), each by at most u |x|; log-sum-exp moves by at most the largest logit error
    and the target logit by its own, so token i's loss is within u (max_j |x_ij| + |x_i,target|) of float64's (the
    fp32 statistics add ~1e-6). The gradients pass three roundings to bf16 (logits, softmax gradient, the matmul
    output), each at most u relative: within 3u of float64 in relative norm (measured ~0.75u). A wrong target, a
    dropped mask or scale, or statistics in bf16 are far outside these."""
    hidden, weight, labels, mask = _inputs(dtype=torch.bfloat16)
    loss = fused_linear_cross_entropy(hidden, weight, labels, loss_weights=mask, chunk_tokens=16)
    assert loss.dtype == torch.float32
    (loss * mask).sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16

    u = 2.0 ** -8
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logits = h64 @ w64.t()  # [s, b, V]
    target = labels.t().unsqueeze(-1)
    want = (torch.logsumexp(logits, -1) - logits.gather(-1, target).squeeze(-1)).t()  # [b, s]
    (want * mask).sum().backward()
    size = logits.detach().abs()
    bound = u * (size.amax(-1) + size.gather(-1, target).squeeze(-1)).t() + 1e-6
    error = (loss.double() - want.detach()).abs()
    assert bool((error <= bound).all()), f"loss error {(error / bound).max():.2f} x its bf16 bound"
    for got, ref in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        relative = ((got.double() - ref).norm() / ref.norm()).item()
        assert relative <= 3 * u, f"gradient off by {relative / u:.2f} u in relative norm"


def test_no_grad_forward_skips_gradient_buffers(runtime):
    hidden, weight, labels, _ = _inputs()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
    torch.testing.assert_close(loss, _reference(hidden, weight, labels).detach(), rtol=0, atol=1e-5)


def test_uniform_scale_detects_mask_proportional_gradients(runtime):
    from bridge_convert.native.cross_entropy import _uniform_scale

    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    scale = _uniform_scale(0.25 * mask, mask, None, 1)
    assert scale is not None and abs(float(scale) - 0.25) < 1e-7
    assert _uniform_scale(torch.tensor([0.5, 0.0, 0.25, 0.25]), mask, None, 1) is None
    assert _uniform_scale(torch.tensor([0.1, 0.1, 0.0, 0.1]), mask, None, 1) is None
    assert float(_uniform_scale(torch.zeros(4), mask, None, 1)) == 0.0
