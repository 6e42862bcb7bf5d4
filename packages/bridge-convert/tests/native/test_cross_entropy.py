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
    hidden, weight, labels, mask = _inputs(dtype=torch.bfloat16)
    loss = fused_linear_cross_entropy(hidden, weight, labels, loss_weights=mask, chunk_tokens=16)
    assert loss.dtype == torch.float32
    ref = _reference(hidden.detach().float(), weight.detach().float(), labels)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0.1)
    (loss * mask).sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


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
