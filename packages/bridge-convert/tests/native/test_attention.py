"""Parity of the native spec with megatron-core's local spec: logits, per-token loss and every gradient (fp32).

The local spec is the reference: ``DotProductAttention`` materialises the scores, RoPE is megatron's unfused
code, the norm is ``torch.nn.RMSNorm`` and the loss is ``vocab_parallel_cross_entropy`` on full logits.
"""

import pytest
import torch
from _native_models import grads, max_grad_diff, pair
from megatron.core.packed_seq_params import PackedSeqParams

TOL = 1e-5
B, S, V = 2, 48, 128


def _batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    return ids, labels, torch.arange(S).expand(B, S)


CASES = {
    "llama-gqa": {},
    "qwen3-qk-norm": {"qk_layernorm": True, "kv_channels": 32},
    "llama32-tied-rope-scaling": {"share_embeddings_and_output_weights": True, "rope_scaling": True,
                                  "rope_scaling_factor": 32.0, "rope_scaling_original_max_position_embeddings": 16},
    "qwen2-qkv-bias": {"add_qkv_bias": True, "rotary_base": 1e6},
    "mha-no-gqa": {"num_query_groups": 4},
    "mistral-sliding-window": {"window_size": (7, 0)},
}


@pytest.mark.parametrize("overrides", list(CASES.values()), ids=list(CASES))
def test_logits_loss_and_grads_match_local_spec(runtime, overrides):
    local, native = pair(**overrides)
    ids, labels, pos = _batch()
    torch.testing.assert_close(native(ids, pos, None), local(ids, pos, None), rtol=0, atol=TOL)
    loss_mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.2).float()
    for model in (local, native):
        loss = model(ids, pos, None, labels=labels, loss_mask=loss_mask)
        ((loss * loss_mask).sum() / loss_mask.sum()).backward()
        model.loss_value = loss.detach()
    torch.testing.assert_close(native.loss_value, local.loss_value, rtol=0, atol=TOL)
    assert max_grad_diff(grads(native), grads(local)) <= TOL


@pytest.mark.parametrize("kind", ["forward", "pre", "pre_kwargs"])
def test_hooks_on_the_output_layer_run_in_the_training_loss(runtime, kind):
    """The fused loss does not call output_layer. Its forward pre-hooks must still run (megatron-core's DDP waits
    there for the overlapped all-gather of the weight) and a forward hook (a LoRA on lm_head) must see the layer
    run: the loss and gradients equal the local spec's, which calls the layer, with the same hook."""
    local, native = pair()
    ids, labels, pos = _batch()
    gen = torch.Generator().manual_seed(2)
    param = torch.nn.Parameter(0.5 * torch.randn(V if kind == "forward" else 64, generator=gen))
    for model in (local, native):
        layer = model.output_layer
        if kind == "forward":
            layer.register_forward_hook(lambda m, args, out: (out[0] + param, *out[1:]))
        elif kind == "pre":
            layer.register_forward_pre_hook(lambda m, args: (args[0] * (1 + param),))
        else:
            layer.register_forward_pre_hook(lambda m, args, kwargs: ((args[0] * (1 + param),), kwargs),
                                            with_kwargs=True)
        loss = model(ids, pos, None, labels=labels)
        loss.mean().backward()
        model.loss_value, model.hook_grad, param.grad = loss.detach(), param.grad.clone(), None
    assert native.hook_grad.abs().sum() > 0
    torch.testing.assert_close(native.loss_value, local.loss_value, rtol=0, atol=TOL)
    torch.testing.assert_close(native.hook_grad, local.hook_grad, rtol=0, atol=TOL)


def test_explicit_attention_mask_is_honoured(runtime):
    """A user mask (bool, True = masked) replaces the causal mask exactly as the local spec applies it."""
    local, native = pair()
    ids, labels, pos = _batch()
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1).expand(B, 1, S, S).clone()
    mask[0, 0, 20:, :5] = True  # the first sample's late tokens may not see its first five
    outs = [m(ids, pos, mask, labels=labels) for m in (local, native)]
    for out in outs:
        out.sum().backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=TOL)
    assert max_grad_diff(grads(native), grads(local)) <= TOL


def _packed_params(lengths: list[int]) -> PackedSeqParams:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                           max_seqlen_kv=max(lengths))


@pytest.mark.parametrize("overrides", [{}, {"qk_layernorm": True, "kv_channels": 32}], ids=["llama", "qwen3"])
def test_packed_documents_match_each_document_alone(runtime, overrides):
    """One packed row of three documents == each document through the local spec alone (logits, loss, grads)."""
    local, native = pair(**overrides)
    lengths = [13, 21, 9]
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(0, V, (1, n), generator=g) for n in lengths]
    doc_labels = [torch.randint(0, V, (1, n), generator=g) for n in lengths]
    ids, labels = torch.cat(docs, dim=1), torch.cat(doc_labels, dim=1)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    params = _packed_params(lengths)

    packed_logits = native(ids, pos, None, packed_seq_params=params)
    alone_logits = torch.cat([local(d, torch.arange(d.shape[1]).unsqueeze(0), None) for d in docs], dim=1)
    torch.testing.assert_close(packed_logits, alone_logits, rtol=0, atol=TOL)

    packed_loss = native(ids, pos, None, labels=labels, packed_seq_params=_packed_params(lengths))
    alone_loss = torch.cat([local(d, torch.arange(d.shape[1]).unsqueeze(0), None, labels=lab)
                            for d, lab in zip(docs, doc_labels, strict=True)], dim=1)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=0, atol=TOL)
    packed_loss.sum().backward()
    alone_loss.sum().backward()
    assert max_grad_diff(grads(native), grads(local)) <= TOL


def test_packed_row_with_tail_padding(runtime):
    """Tokens past cu_seqlens[-1] (padding to a fixed length) do not disturb the documents before them."""
    local, native = pair()
    lengths = [10, 14]
    ids = torch.randint(0, V, (1, 30), generator=torch.Generator().manual_seed(2))
    pos = torch.zeros(1, 30, dtype=torch.long)
    out = native(ids, pos, None, packed_seq_params=_packed_params(lengths))
    first = local(ids[:, :10], torch.arange(10).unsqueeze(0), None)
    second = local(ids[:, 10:24], torch.arange(14).unsqueeze(0), None)
    torch.testing.assert_close(out[:, :24], torch.cat([first, second], dim=1), rtol=0, atol=TOL)


@pytest.mark.parametrize("overrides", [{}, {"qk_layernorm": True, "kv_channels": 32}], ids=["llama", "qwen3"])
def test_core_attention_inputs_own_their_storage(runtime, monkeypatch, overrides):
    """SDPA saves q, k, v for its backward; a view into the fused QKV output would keep all of it alive."""
    import torch.nn.functional as F

    sdpa, seen = F.scaled_dot_product_attention, []

    def checked(q, k, v, *args, **kwargs):
        seen.append([t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in (q, k, v)])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", checked)
    _, native = pair(**overrides)
    ids = torch.randint(0, 128, (2, 16))
    native(ids, torch.arange(16).expand(2, 16), None, labels=ids, loss_mask=torch.ones(2, 16))
    assert seen and all(all(owns) for owns in seen), seen
