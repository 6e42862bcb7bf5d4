"""recompute_activation_output: the SwiGLU output is released after fc2's forward and refilled for its backward."""

import pytest
import torch
from _native_models import build, copy_weights, grads, max_grad_diff, randomise_norms

from bridge_convert.native.swiglu import swiglu_into_consumer

B, S = 2, 32


def _run(model, keep: list | None = None):
    """Forward + backward; with ``keep``, the saved activations (storage bytes right after the forward, by shape)."""
    ids = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(ids, torch.arange(S).expand(B, S), None, labels=ids, loss_mask=torch.ones(B, S))
    if keep is not None:
        params = {p.untyped_storage()._cdata for p in model.parameters()}  # _cdata: the StorageImpl's address
        keep.append({(t.untyped_storage()._cdata, tuple(t.shape)): t.untyped_storage().nbytes()
                     for t in saved if t.untyped_storage()._cdata not in params})
    loss.sum().backward()
    return loss.detach()


def test_recomputed_swiglu_output_gives_the_same_loss_and_grads(runtime):
    local = build("local")
    randomise_norms(local)
    native = build("native", 1, recompute_activation_output=True)
    copy_weights(local, native)
    torch.testing.assert_close(_run(native), _run(local), rtol=0, atol=1e-6)
    assert max_grad_diff(grads(native), grads(local)) <= 1e-5


def test_recompute_releases_the_swiglu_outputs(runtime):
    plain, lean = build("native"), build("native", 1, recompute_activation_output=True)
    copy_weights(plain, lean)
    held = []
    _run(plain, held)
    _run(lean, held)
    ffn, layers = plain.config.ffn_hidden_size, plain.config.num_layers
    act_shape = (S, B, ffn)
    released = [n for (_, shape), n in held[1].items() if shape == act_shape]
    assert released == [0] * layers  # fc2's saved input, one per layer, holds no memory after the forward
    kept = [n for (_, shape), n in held[0].items() if shape == act_shape]
    assert len(kept) >= layers and all(n > 0 for n in kept)
    per_layer = B * S * ffn * 4  # fp32
    assert sum(held[0].values()) - sum(held[1].values()) >= layers * per_layer


def test_refill_runs_before_the_consumer_backward_and_survives_retain_graph():
    linear = torch.nn.Linear(8, 3)
    y = torch.randn(5, 16, requires_grad=True)
    out = swiglu_into_consumer(y * 1.0, linear, triton=False, recompute_output=True)
    out.sum().backward(retain_graph=True)
    first = (y.grad.clone(), linear.weight.grad.clone())
    out.sum().backward()
    gate, up = y.detach().chunk(2, dim=-1)
    want_w = torch.ones(5, 3).t() @ (torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(first[1], want_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.grad, 2 * first[0])


def test_recompute_needs_the_native_spec(runtime):
    with pytest.raises(ValueError, match="recompute_activation_output is a feature of the native spec"):
        build("local", recompute_activation_output=True)
