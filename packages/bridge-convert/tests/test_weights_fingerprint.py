"""The base-weights fingerprint: HF's q_proj rows are the oracle for what it reads; layouts and dtypes agree."""

import pytest
import torch

from bridge_convert import AutoBridge
from bridge_convert.runtime import ParallelLayout, initialize_parallel
from bridge_convert.testing import run_multiprocess, save_tiny_hf_checkpoint
from bridge_convert.weights_fingerprint import base_weights_fingerprint, same_weights


def _perturbed(hf: str, out, relative: float) -> str:
    """``hf`` with every weight moved by ``relative`` of itself (a fine-tune of it, as far as the weights go)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1 + relative * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    return str(out)


def test_it_reads_the_first_query_head_of_layer_0_at_any_dtype(hf_checkpoints, runtime, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = hf_checkpoints["llama32"]
    bridge = AutoBridge.from_hf_pretrained(hf)
    ours = base_weights_fingerprint(bridge.to_megatron_model(load_weights=True, wrap_with_ddp=False))
    q = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).model.layers[0].self_attn.q_proj.weight
    head_dim = bridge.to_megatron_provider().kv_channels
    signs = torch.randint(0, 2, (q.shape[1],), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    torch.testing.assert_close(torch.tensor(ours["projections"], dtype=torch.float64),
                               q.detach().double()[:head_dim] @ signs, rtol=1e-6, atol=1e-7)
    for dtype in (torch.bfloat16, torch.float16):  # rounded weights: the same base
        rounded = base_weights_fingerprint(bridge.to_megatron_model(load_weights=True, wrap_with_ddp=False,
                                                                    params_dtype=dtype))
        assert same_weights(ours, rounded) is True, dtype
    # another draw of the same shapes, and the base moved by 5% (a fine-tune of it): other weights
    other = save_tiny_hf_checkpoint(tmp_path / "other", "llama32", seed=77)
    for path in (other, _perturbed(hf, tmp_path / "tuned", 0.05)):
        theirs = base_weights_fingerprint(AutoBridge.from_hf_pretrained(path).to_megatron_model(
            load_weights=True, wrap_with_ddp=False))
        assert same_weights(ours, theirs) is False, path
    assert same_weights(None, ours) is None and same_weights({**ours, "weights": "x"}, ours) is None
    assert same_weights({**ours, "projections": ["a"]}, ours) is None  # a hand-edited record: nothing to say


def _tp2_body(hf: str):
    initialize_parallel(ParallelLayout(tensor_model_parallel_size=2), seed=1234)
    return base_weights_fingerprint(AutoBridge.from_hf_pretrained(hf).to_megatron_model(
        load_weights=True, wrap_with_ddp=False, tensor_model_parallel_size=2))


@pytest.mark.multiproc
def test_tensor_parallel_rank_0_gives_the_single_process_fingerprint(hf_checkpoints, runtime):
    hf = hf_checkpoints["llama31"]
    single = base_weights_fingerprint(AutoBridge.from_hf_pretrained(hf).to_megatron_model(load_weights=True,
                                                                                          wrap_with_ddp=False))
    first, second = run_multiprocess(_tp2_body, 2, hf)
    assert first == single and second is None
