"""Every family, at (TP, PP) in {(1,1), (2,1), (1,2)}: HF -> Megatron logits match transformers, and
Megatron -> HF reproduces the source checkpoint bit for bit (names, dtypes, shards, index)."""

import json
from pathlib import Path

import pytest
import torch

from bridge_convert import AutoBridge
from bridge_convert.forward import forward_logits
from bridge_convert.runtime import initialize_parallel
from bridge_convert.testing import FAMILIES, assert_same_checkpoint, run_multiprocess, save_tiny_hf_checkpoint

SEQ = 20


def _input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(11))


def _hf_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_input_ids()).logits.float()


def _convert(path, out, **layout) -> float:
    """Import at ``layout``, return max |logits - HF logits|, export to ``out``."""
    bridge = AutoBridge.from_hf_pretrained(path)
    model = bridge.to_megatron_model(load_weights=True, wrap_with_ddp=False, **layout)
    diff = (forward_logits(model, _input_ids()) - _hf_logits(path)).abs().max().item()
    bridge.save_hf_pretrained(model, out)
    return diff


def _parallel_body(paths: dict[str, str], out_root: str, tp: int, pp: int) -> dict[str, float]:
    initialize_parallel()
    return {family: _convert(path, f"{out_root}/{family}", tensor_model_parallel_size=tp,
                             pipeline_model_parallel_size=pp) for family, path in paths.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_and_logits_world_size_one(family, hf_checkpoints, tmp_path, runtime):
    diff = _convert(hf_checkpoints[family], tmp_path / "out")
    assert diff <= 1e-4
    assert_same_checkpoint(hf_checkpoints[family], tmp_path / "out")


@pytest.mark.parametrize("family", ["llama32", "qwen2", "qwen3"])
def test_roundtrip_and_logits_local_spec(family, hf_checkpoints, tmp_path, runtime):
    # megatron-core's own reference modules: same parameter names, same numbers.
    assert _convert(hf_checkpoints[family], tmp_path / "out", transformer_impl="local") <= 1e-4
    assert_same_checkpoint(hf_checkpoints[family], tmp_path / "out")


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_roundtrip_and_logits_two_ranks(tp, pp, hf_checkpoints, tmp_path):
    diffs = run_multiprocess(_parallel_body, 2, hf_checkpoints, str(tmp_path), tp, pp)
    for rank_diffs in diffs:  # every rank sees the full logits
        for family, diff in rank_diffs.items():
            assert diff <= 1e-4, f"{family}: max |megatron - HF| logits = {diff}"
    for family in FAMILIES:
        assert_same_checkpoint(hf_checkpoints[family], tmp_path / family)


def test_bf16_checkpoint_roundtrips_bit_exactly(tmp_path, runtime):
    src = save_tiny_hf_checkpoint(tmp_path / "src", "llama32", dtype=torch.bfloat16, max_shard_size="60KB")
    bridge = AutoBridge.from_hf_pretrained(src)
    model = bridge.to_megatron_model(load_weights=True)
    assert bridge.to_megatron_provider(load_weights=False).params_dtype == torch.bfloat16
    bridge.save_hf_pretrained(model, tmp_path / "out")
    assert_same_checkpoint(src, tmp_path / "out")


def test_bf16_checkpoint_roundtrips_through_fp32_params(tmp_path, runtime):
    src = save_tiny_hf_checkpoint(tmp_path / "src", "qwen2", dtype=torch.bfloat16)
    bridge = AutoBridge.from_hf_pretrained(src)
    model = bridge.to_megatron_model(load_weights=True, params_dtype=torch.float32)
    bridge.save_hf_pretrained(model, tmp_path / "out")
    assert_same_checkpoint(src, tmp_path / "out")


def _to_legacy_rope_layout(path: Path) -> dict:
    """Rewrite config.json the way Llama 3.1/3.2 configs ship on the hub: rope_scaling + top-level rope_theta."""
    raw = json.loads((path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    raw["torch_dtype"] = raw.pop("dtype")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return raw


def test_legacy_rope_config_converts_and_exports_faithfully(tmp_path, runtime):
    src = Path(save_tiny_hf_checkpoint(tmp_path / "src", "llama31"))
    legacy = _to_legacy_rope_layout(src)
    assert _convert(src, tmp_path / "out") <= 1e-4
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rope_parameters" not in exported and "dtype" not in exported
    assert exported["rope_theta"] == legacy["rope_theta"]
    assert exported["rope_scaling"] == legacy["rope_scaling"]
    assert exported["torch_dtype"] == "float32"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "out").rope_parameters == AutoConfig.from_pretrained(
        src).rope_parameters


def test_llama3_rope_parameters_other_than_megatron_defaults_are_reproduced(tmp_path, runtime):
    # original_max_position_embeddings=64 (not megatron-core's fixed 8192) changes which frequencies are scaled;
    # building the model with megatron's defaults would give different logits.
    src = save_tiny_hf_checkpoint(tmp_path / "src", "llama31")
    bridge = AutoBridge.from_hf_pretrained(src)
    provider = bridge.to_megatron_provider()
    assert provider.rope_scaling_original_max_position_embeddings == 64
    assert _convert(src, tmp_path / "out") <= 1e-4
    provider.rope_scaling_original_max_position_embeddings = 8192
    model = provider.provide_distributed_model(wrap_with_ddp=False)
    assert (forward_logits(model, _input_ids()) - _hf_logits(src)).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_an_explicit_head_dim_converts_and_exports_bit_exactly(family, tmp_path, runtime):
    """transformers honours config.head_dim when it is not hidden_size / heads; Qwen2's export refused such a
    model ("cannot express this model") although it imported it with transformers' logits."""
    path = save_tiny_hf_checkpoint(tmp_path / "src", family, head_dim=32)  # hidden 64, 4 heads: 16 by default
    assert json.loads((Path(path) / "config.json").read_text())["head_dim"] == 32
    assert _convert(path, tmp_path / "out") <= 1e-4
    assert_same_checkpoint(path, tmp_path / "out")
