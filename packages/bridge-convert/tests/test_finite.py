"""NaN / inf weights are refused by every conversion path, and so is a cast that would make them (float16 holds
|x| <= 65504): import and export, offline and through the built model, naming the tensors and writing nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge_convert import AutoBridge
from bridge_convert.finite import NonFinite, all_finite
from bridge_convert.offline import export_megatron_checkpoint, import_hf_checkpoint

TENSOR = "model.layers.1.mlp.down_proj.weight"


def _with_value(src: str, dst: Path, value: float) -> Path:
    """A copy of the HF checkpoint ``src`` with one element of :data:`TENSOR` set to ``value``."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][TENSOR]
    tensors = load_file(str(shard))
    tensors[TENSOR].view(-1)[3] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return dst


def _nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_finite_check_matches_isfinite(dtype):
    values = torch.randn(3000, generator=torch.Generator().manual_seed(0)).to(dtype)
    largest = torch.full((5,), torch.finfo(dtype).max, dtype=dtype)  # finite, however large
    assert all_finite(values) and all_finite(largest) and all_finite(values[:0])
    assert all_finite(torch.arange(5))  # integers: nothing to check
    for bad in (float("inf"), -float("inf"), float("nan")):
        damaged = values.clone()
        damaged[2500] = bad
        assert all_finite(damaged) == bool(torch.isfinite(damaged).all()) is False


def test_causes_are_told_apart():
    found = NonFinite()
    big = torch.tensor([1.0, 7e4])
    found.check(big.half(), {"a": big})  # finite source, the cast overflows
    found.check(torch.tensor([float("nan")]).half(), {"b": torch.tensor([float("nan")])})
    found.check(torch.ones(2), {"c": torch.ones(2)})  # fine
    found.check(torch.tensor([float("inf")]), {"q": torch.ones(1), "k": torch.tensor([float("inf")])})
    message = found.problem("X", "import", "--dtype bfloat16")
    assert "X has non-finite (NaN / inf) values in 2 tensors: b, k; refusing to import them" in message
    assert "1 tensors hold values beyond the float16 range (|x| > 65504), which the cast would store as inf: a" \
        in message and message.endswith("choose a wider dtype: --dtype bfloat16")
    assert NonFinite().problem("X", "import", "") is None


def test_offline_import_refuses_a_float16_overflow_and_keeps_bfloat16(hf_checkpoints, tmp_path):
    hf = _with_value(hf_checkpoints["llama"], tmp_path / "hf", 1e5)
    with pytest.raises(ValueError, match=rf"beyond the float16 range .*: {TENSOR}; refusing to import them; choose "
                                         r"a wider dtype: --dtype bfloat16"):
        import_hf_checkpoint(hf, tmp_path / "mc", dtype="float16", progress=False)
    _nothing_written(tmp_path, "mc")
    import_hf_checkpoint(hf, tmp_path / "mc", dtype="bfloat16", progress=False)  # in range there: converted
    # exporting that bf16 checkpoint to float16 is refused the same way; to float32 it is exact
    with pytest.raises(ValueError, match=rf"Megatron checkpoint .*: 1 tensors hold values beyond the float16 range "
                                         rf".*: {TENSOR}; refusing to export them"):
        export_megatron_checkpoint(tmp_path / "mc", tmp_path / "out", dtype="float16", progress=False)
    _nothing_written(tmp_path, "out")
    export_megatron_checkpoint(tmp_path / "mc", tmp_path / "out", dtype="float32", progress=False)
    exported = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        exported.update(load_file(str(shard)))
    assert exported[TENSOR].view(-1)[3].item() == torch.tensor(1e5).bfloat16().item()


@pytest.mark.parametrize("value,dtype,cause", [(float("nan"), None, "non-finite"),
                                               (float("-inf"), None, "non-finite"),
                                               (-1e5, "float16", "beyond the float16 range")])
def test_loading_into_a_built_model_refuses_them(value, dtype, cause, hf_checkpoints, tmp_path, runtime):
    hf = _with_value(hf_checkpoints["qwen2"], tmp_path / "hf", value)
    bridge = AutoBridge.from_hf_pretrained(hf)
    overrides = {"params_dtype": dtype} if dtype else {}
    with pytest.raises(ValueError, match=rf"HF checkpoint .*hf.*{cause}.* {TENSOR}; refusing to load them"):
        bridge.to_megatron_model(load_weights=True, **overrides)
    with pytest.raises(ValueError, match=rf"{cause}.* {TENSOR}"):  # the CLI's model-building path: nothing saved
        AutoBridge.import_ckpt(hf, tmp_path / "mc", offline=False, **overrides)
    _nothing_written(tmp_path, "mc")


def test_save_hf_pretrained_refuses_them(hf_checkpoints, tmp_path, runtime):
    bridge = AutoBridge.from_hf_pretrained(hf_checkpoints["llama"])
    model = bridge.to_megatron_model(load_weights=True)
    weight = model[0].decoder.layers[1].mlp.linear_fc2.weight
    with torch.no_grad():
        weight.view(-1)[3] = 1e5
    with pytest.raises(ValueError, match=rf"the model saved to .*out: 1 tensors hold values beyond the float16 range "
                                         rf".*: {TENSOR}; refusing to export them"):
        bridge.save_hf_pretrained(model, tmp_path / "out", dtype="float16")
    _nothing_written(tmp_path, "out")
    bridge.save_hf_pretrained(model, tmp_path / "out", dtype="bfloat16")
    with torch.no_grad():
        weight.view(-1)[5] = float("nan")
    with pytest.raises(ValueError, match=rf"non-finite \(NaN / inf\) values in 1 tensors: {TENSOR}; refusing to "
                                         "export them"):
        bridge.save_hf_pretrained(model, tmp_path / "out2")
    _nothing_written(tmp_path, "out2")
