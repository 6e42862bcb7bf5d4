"""The conversion tests on CUDA (lent GPU machines, `-m gpu`): NCCL at TP=2 / PP=2, bf16, and the TE spec."""

import pytest
import torch

from bridge_convert import AutoBridge
from bridge_convert.forward import forward_logits
from bridge_convert.runtime import initialize_parallel
from bridge_convert.specs import te_available
from bridge_convert.testing import FAMILIES, assert_same_checkpoint, run_multiprocess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEQ = 20


def _input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(11))


def _hf_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        return model(_input_ids().cuda()).logits.float().cpu()


def _convert_on_gpu(paths: dict[str, str], out_root: str, overrides: dict) -> dict[str, float]:
    initialize_parallel()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    diffs = {}
    for family, path in paths.items():
        bridge = AutoBridge.from_hf_pretrained(path)
        model = bridge.to_megatron_model(load_weights=True, **overrides)
        diffs[family] = (forward_logits(model, _input_ids()) - _hf_logits(path)).abs().max().item()
        bridge.save_hf_pretrained(model, f"{out_root}/{family}")
    return diffs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_roundtrip_on_two_gpus_with_nccl(tp, pp, hf_checkpoints, tmp_path):
    results = run_multiprocess(_convert_on_gpu, 2, hf_checkpoints, str(tmp_path),
                               {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp})
    for diffs in results:
        for family, diff in diffs.items():
            assert diff <= 1e-4, f"{family}: {diff}"
    for family in FAMILIES:
        assert_same_checkpoint(hf_checkpoints[family], tmp_path / family)


# Transformer Engine runs its fp32 GEMMs in TF32 (cuBLAS-LT compute type 32F_FAST_TF32) whatever torch's
# allow_tf32 says; NVIDIA_TF32_OVERRIDE=0, read by cuBLAS when the process loads it, turns that off. Measured on
# one H200 (TE 2.20.2, 2026-12-01), max |logits - HF fp32|: with the override 1.2e-7 .. 2.4e-7 for every family
# (the mapping is exact, like the native and local specs); with TF32 1.9e-4 (llama32) .. 5.0e-4 (qwen3), which is
# TF32's 10-bit mantissa (relative 2^-11 per product) on these logits, hence the 1e-3 bound for that case.
TE_TF32_TOLERANCE = 1e-3


@pytest.mark.parametrize("impl,tf32_override", [("native", None), ("local", None), ("transformer_engine", "0"),
                                                ("transformer_engine", None)],
                         ids=["native", "local", "transformer_engine-fp32", "transformer_engine-tf32"])
def test_roundtrip_on_one_gpu_per_spec(impl, tf32_override, hf_checkpoints, tmp_path, monkeypatch):
    if impl == "transformer_engine" and not te_available():
        pytest.skip("Transformer Engine is not importable here")
    if tf32_override is not None:
        monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", tf32_override)  # the spawned process inherits it
    results = run_multiprocess(_convert_on_gpu, 1, hf_checkpoints, str(tmp_path), {"transformer_impl": impl})
    tolerance = TE_TF32_TOLERANCE if impl == "transformer_engine" and tf32_override is None else 1e-4
    print(f"{impl} (NVIDIA_TF32_OVERRIDE={tf32_override}): max |logits - HF fp32 logits| per family "
          + ", ".join(f"{family} {diff:.3g}" for family, diff in results[0].items()))
    for family, diff in results[0].items():
        assert diff <= tolerance, f"{family} ({impl}): {diff}"
    for family in FAMILIES:
        assert_same_checkpoint(hf_checkpoints[family], tmp_path / family)
