"""LoRA / DoRA on a Transformer Engine model whose base weights are FP8 (`-m gpu`, TE importable): fine-tuning keeps
the frozen FP8 base as loaded, and merge / unmerge / the merged HF export work on FP8 weights.

The oracle is HF ``peft``'s merge arithmetic in float64: the merged export must equal ``W + (alpha / r) B A``
(DoRA: ``m / ||W + s B A|| (W + s B A)``, per output row), with ``W`` the model's base as exported before the merge
(the e4m3 values of the FP8 weights) and ``A``, ``B``, ``m`` the adapter that ``save_hf_adapter`` wrote, to the one
rounding of the merged weight to e4m3.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bridge_convert.specs import te_available
from bridge_convert.testing import run_multiprocess, save_tiny_hf_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not te_available(), reason="Transformer Engine is not importable here")]

# FP8 GEMMs need multiples of 16; 4 layers, as the current-scaling recipe keeps the first and last in bf16.
SHAPE = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, vocab_size=512)
RECIPE = "bf16_with_fp8_current_scaling_mixed"  # FP8 weights (fp8_param_gather), Hopper and newer


@pytest.fixture(scope="module")
def fp8_llama(tmp_path_factory) -> str:
    return save_tiny_hf_checkpoint(tmp_path_factory.mktemp("fp8-llama"), "llama", seed=9, max_shard_size="5MB",
                                   **SHAPE)


def _finetune_merge_export(hf_path: str, method: str, out: str) -> dict:
    """Fine-tune with FP8 weights, then (with large random adapters) export the adapter, merge, export, unmerge,
    export. Returns the losses, the FP8 parameter count, whether training moved the adapters, and file paths."""
    from megatron.core.utils import unwrap_model

    from bridge_convert import AutoBridge
    from bridge_convert.quantized import is_quantized_param
    from bridge_data import PretrainDataConfig
    from bridge_peft import DoRA, LoRA, merge_adapters, save_hf_adapter, unmerge_adapters
    from bridge_train import (
        CheckpointConfig,
        ConfigContainer,
        LoggerConfig,
        OptimizerConfig,
        SchedulerConfig,
        TrainConfig,
        finetune,
    )

    bridge = AutoBridge.from_hf_pretrained(hf_path)
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.transformer_impl = "transformer_engine"
    peft = (LoRA if method == "lora" else DoRA)(dim=8, alpha=16)
    cfg = ConfigContainer(
        model=provider, peft=peft, mixed_precision=RECIPE,
        train=TrainConfig(train_iters=6, micro_batch_size=2, global_batch_size=2),
        dataset=PretrainDataConfig(seq_length=128, mock=True, seed=3),
        optimizer=OptimizerConfig(lr=1e-2, use_distributed_optimizer=True),
        scheduler=SchedulerConfig(lr_warmup_iters=0),
        checkpoint=CheckpointConfig(pretrained_checkpoint=hf_path, finetune=True),
        logger=LoggerConfig(log_interval=1, print_config=False, progress_bar=False),
    )
    cfg.ddp.use_distributed_optimizer = True
    result = finetune(cfg)
    model = result.model
    named = dict(unwrap_model(model)[0].named_parameters())
    quantized = [n for n, p in named.items() if is_quantized_param(p)]
    trained_b = [p for n, p in named.items() if getattr(p, "bridge_adapter", False) and "lora_b" in n.lower()]
    moved = bool(trained_b) and all(p.detach().float().abs().max().item() > 0 for p in trained_b)

    def export(name: str) -> str:
        path = Path(out) / name
        bridge.save_hf_pretrained(model, path)
        return str(path)

    base = export("base")  # after fine-tuning: the frozen FP8 base as loaded
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters large enough that a merge that is not applied (or applied twice) shows
        for name, param in named.items():
            if getattr(param, "bridge_adapter", False):
                noise = torch.randn(param.shape, generator=gen).to(param.device, param.dtype)
                param.copy_(param * (1 + 0.3 * noise.clamp(-2, 2)) if name.endswith("magnitude") else 0.05 * noise)
    save_hf_adapter(bridge, model, Path(out) / "adapter")
    merge_adapters(model)
    merged = export("merged")
    unmerge_adapters(model)
    unmerged = export("unmerged")
    return {"losses": list(result), "quantized": quantized, "moved": moved, "base": base, "merged": merged,
            "unmerged": unmerged, "adapter": str(Path(out) / "adapter")}


def _tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        out.update({n: t.double() for n, t in load_file(shard).items()})
    return out


def _peft_merged(base: dict, adapter_dir: str) -> tuple[dict, dict[str, float]]:
    """HF peft's merge arithmetic on ``base`` (float64): the expected merged weights, and per adapted weight
    the largest 1 / (DoRA row factor) (1 for LoRA), by which unmerging scales the merge's rounding error."""
    import json

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    adapter = _tensors(adapter_dir)
    expected, adapted = dict(base), {}
    for key in adapter:
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        weight = base[f"{module}.weight"]
        merged = weight + scale * adapter[f"base_model.model.{module}.lora_B.weight"] @ adapter[key]
        magnitude = adapter.get(f"base_model.model.{module}.lora_magnitude_vector")
        factor = magnitude / merged.norm(dim=1) if config.get("use_dora") else torch.ones(len(merged))
        expected[f"{module}.weight"] = factor[:, None] * merged
        adapted[f"{module}.weight"] = float((1 / factor).max())
    return expected, adapted


def _close_to_fp8(got: dict, want: dict, what: str) -> None:
    """Every tensor within e4m3 rounding of ``want``: |error| <= amax / 14 (current scaling maps the amax into
    (224, 448], where e4m3's spacing is 32); bf16 tensors (edge layers, norms, embeddings) are far closer."""
    assert got.keys() == want.keys(), what
    for name, value in got.items():
        amax = want[name].abs().max()
        err = (value - want[name]).abs().max()
        assert torch.isfinite(value).all() and err <= amax / 14, (what, name, float(err), float(amax))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_on_fp8_weights_trains_merges_and_exports(fp8_llama, tmp_path, method):
    from bridge_train.config.mixed_precision import MIXED_PRECISION_RECIPES, quantization_support_problems

    mp = MIXED_PRECISION_RECIPES[RECIPE]()
    if quantization_support_problems(mp.fp8, mp.fp8_recipe, None, None, RECIPE):
        pytest.skip(f"this GPU does not run {RECIPE}")
    got = run_multiprocess(_finetune_merge_export, 1, fp8_llama, method, str(tmp_path))[0]
    assert got["quantized"], "no FP8 weights in the model: the test would not test FP8"
    assert all(math.isfinite(x) for x in got["losses"]), got["losses"]
    assert got["moved"], "fine-tuning did not reach the adapters (every lora_B still zero)"
    hf = _tensors(fp8_llama)
    base = _tensors(got["base"])
    _close_to_fp8(base, hf, "the base after fine-tuning")  # the HF weights to e4m3 rounding: loaded, then frozen
    expected, adapted = _peft_merged(base, got["adapter"])
    assert len(adapted) == 7 * SHAPE["num_hidden_layers"], sorted(adapted)
    merged = _tensors(got["merged"])
    _close_to_fp8(merged, expected, "the merged export")
    # the merge changed the adapted weights by far more than FP8 rounding (so the check above is not vacuous)
    unchanged = [name for name in adapted if (expected[name] - base[name]).abs().max() <= base[name].abs().max() / 4]
    assert not unchanged, unchanged
    # unmerge: the base again, two e4m3 roundings away (the merge's, scaled back by DoRA's row factor, and its own)
    unmerged = _tensors(got["unmerged"])
    assert unmerged.keys() == base.keys()
    for name, value in unmerged.items():
        bound = base[name].abs().max() / 14 + adapted.get(name, 0.0) * expected[name].abs().max() / 14
        err = (value - base[name]).abs().max()
        assert err <= bound, (name, float(err), float(bound))
