"""Assertions on HF checkpoints on disk: the round-trip oracle of the conversion tests."""

__all__ = ["assert_same_checkpoint", "read_tensors"]

import json
from pathlib import Path

import torch
from safetensors import safe_open


def read_tensors(path) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (shard file, tensor) of every safetensors file in ``path``."""
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = (file.name, f.get_tensor(name))
    return out


def assert_same_checkpoint(source, exported) -> None:
    """Same tensor names, shard files, dtypes and bits; same index weight map (when the source has one)."""
    src, out = read_tensors(source), read_tensors(exported)
    assert sorted(src) == sorted(out), f"names differ: {sorted(set(src) ^ set(out))}"
    for name, (file, tensor) in src.items():
        out_file, out_tensor = out[name]
        assert out_file == file, f"{name}: shard {out_file} != source shard {file}"
        assert out_tensor.dtype == tensor.dtype, f"{name}: dtype {out_tensor.dtype} != {tensor.dtype}"
        assert out_tensor.shape == tensor.shape, f"{name}: shape {out_tensor.shape} != {tensor.shape}"
        assert torch.equal(out_tensor.view(torch.uint8), tensor.view(torch.uint8)), f"{name}: bits differ"
    index = Path(source) / "model.safetensors.index.json"
    out_index = Path(exported) / "model.safetensors.index.json"
    assert index.exists() == out_index.exists()
    if index.exists():
        assert json.loads(out_index.read_text())["weight_map"] == json.loads(index.read_text())["weight_map"]
    for file in Path(source).glob("*.safetensors"):  # headers and data: the very same bytes
        assert (Path(exported) / file.name).read_bytes() == file.read_bytes(), f"{file.name} is not byte-identical"
