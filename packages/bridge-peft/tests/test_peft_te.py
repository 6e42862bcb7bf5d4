"""Transformer Engine spec (GPU): adapters on TE's fused layernorm-linear read the norm output, forward and backward.

Run on a CUDA machine with TE: ``uv run pytest packages/bridge-peft/tests/test_te.py -m gpu``.
"""

import pytest
import torch
from peft_helpers import randomize_adapters

from bridge_convert import AutoBridge
from bridge_convert.forward import forward_logits
from bridge_convert.specs import te_available
from bridge_peft import CanonicalLoRA, DoRA, LoRA, save_hf_adapter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not te_available(), reason="needs Transformer Engine and a CUDA GPU")]

METHODS = {"lora": LoRA, "dora": DoRA, "canonical": CanonicalLoRA}


def _model(ckpt, impl):
    bridge = AutoBridge.from_hf_pretrained(ckpt)
    return bridge, bridge.to_megatron_model(load_weights=True, transformer_impl=impl, params_dtype=torch.float32)


@pytest.fixture(autouse=True)
def _no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("method", sorted(METHODS))
def test_te_adapters_match_peft_and_native_gradients(method, hf_checkpoints, runtime, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = hf_checkpoints["llama31"]
    bridge, te_model = _model(ckpt, "transformer_engine")
    qkv = te_model[0].decoder.layers[0].self_attention.linear_qkv
    assert hasattr(qkv, "layer_norm_weight"), type(qkv)  # the fused layernorm-linear is what is tested
    _, native = _model(ckpt, "native")
    for model in (te_model, native):
        METHODS[method](dim=4, alpha=8)(model)
        randomize_adapters(model, seed=1)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = forward_logits(te_model, ids)
    save_hf_adapter(bridge, te_model, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)

    grads = []
    for model in (te_model, native):
        model[0].train()
        tokens = ids.cuda()
        positions = torch.arange(16, device="cuda").expand(2, 16)
        model[0](tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:]).float().mean().backward()
        grads.append({n: p.grad.detach().cpu() for n, p in model[0].named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-3, rtol=2e-2, msg=name)
