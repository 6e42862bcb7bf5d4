"""Output-releasing recompute of the native spec, against keeping the outputs and against the local spec.

* ``recompute_activation_output``: the SwiGLU output is released after fc2's forward and refilled for its backward;
* ``recompute_modules=["layernorm"]``: each norm output is released after the linear layer that reads it.
"""

import pytest
import torch
from _native_models import build, copy_weights, grads, max_grad_diff, randomise_norms

from bridge_convert.native.norm import NativeNorm, recompute_output_for
from bridge_convert.native.swiglu import swiglu_into_consumer

LAYERNORM = dict(recompute_granularity="selective", recompute_modules=["layernorm"])

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


def test_recomputed_norm_outputs_give_the_same_loss_and_grads(runtime):
    local = build("local")
    randomise_norms(local)
    native = build("native", 1, **LAYERNORM)
    lean = build("native", 2, recompute_activation_output=True, **LAYERNORM)
    copy_weights(local, native)
    copy_weights(local, lean)
    want = _run(local)
    for model in (native, lean):
        torch.testing.assert_close(_run(model), want, rtol=0, atol=1e-6)
        assert max_grad_diff(grads(model), grads(local)) <= 1e-5


def test_layernorm_recompute_releases_the_norm_outputs(runtime):
    plain, lean = build("native"), build("native", 1, **LAYERNORM)
    copy_weights(plain, lean)
    held = []
    _run(plain, held)
    _run(lean, held)
    hidden, layers = plain.config.hidden_size, plain.config.num_layers
    norm_out = (S, B, hidden)
    # linear_qkv's and linear_fc1's saved inputs: the two norm outputs of every layer, empty after the forward
    released = [n for (_, shape), n in held[1].items() if shape == norm_out and n == 0]
    assert len(released) == 2 * layers
    per_layer = 2 * B * S * hidden * 4  # fp32
    assert sum(held[0].values()) - sum(held[1].values()) >= layers * per_layer


def test_norm_refill_runs_before_the_consumer_backward_and_survives_retain_graph(runtime):
    from _native_models import TINY, provider

    config = provider("native").finalize()
    norm = NativeNorm(config, TINY["hidden_size"])
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    linear = torch.nn.Linear(TINY["hidden_size"], 3)
    x = torch.randn(5, TINY["hidden_size"], requires_grad=True)
    want_out = linear(norm(x))
    want_out.sum().backward()
    want = (x.grad.clone(), linear.weight.grad.clone(), norm.weight.grad.clone())
    x.grad = linear.weight.grad = norm.weight.grad = None
    recompute_output_for(norm, linear)
    normed = norm(x)
    out = linear(normed)
    assert normed.untyped_storage().nbytes() == 0  # released once the consumer has run
    out.sum().backward(retain_graph=True)
    got = (x.grad.clone(), linear.weight.grad.clone(), norm.weight.grad.clone())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * got[0])
    with pytest.raises(ValueError, match="already releases"):
        recompute_output_for(norm, linear)
    # the norm output reaching some other module first is not released
    other = norm(x)
    linear(other * 1.0)
    assert other.untyped_storage().nbytes() > 0


def test_layernorm_recompute_refuses_compile_layers(runtime):
    with pytest.raises(ValueError, match="torch.compile cannot trace"):
        build("native", compile_layers=True, **LAYERNORM)


def test_recompute_keeps_nothing_alive_after_the_backward(runtime):
    # The refill hooks live as long as the graph; once the backward has used what they refilled, the refilled
    # tensors and their sources must be freed exactly as without recompute (else the backward's memory grows).
    from torch.multiprocessing.reductions import StorageWeakRef

    model = build("native", recompute_activation_output=True, **LAYERNORM)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    refs = []

    def pack(t):
        if t.untyped_storage()._cdata not in params and t.dim() >= 3:  # activations, not loss or grads
            refs.append((tuple(t.shape), StorageWeakRef(t.untyped_storage())))
        return t

    ids = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, torch.arange(S).expand(B, S), None, labels=ids, loss_mask=torch.ones(B, S))
    loss.sum().backward()  # `loss` keeps the graph (and the hooks in it) alive past this point
    alive = [shape for shape, ref in refs if not ref.expired()]
    assert not alive, alive
