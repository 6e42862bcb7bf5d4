"""Lazy reader and streaming writer on real files written by safetensors / torch."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge_convert.safetensors_io import (
    FilePlan,
    LazyHFCheckpoint,
    ShardedSafetensorsWriter,
    SourceLayout,
    parse_size,
)


def _sharded(tmp_path):
    a, b, c = torch.randn(3, 4), torch.arange(6, dtype=torch.int64), torch.randn(2, dtype=torch.bfloat16)
    save_file({"a": a, "b": b}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"c": c}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00001-of-00002.safetensors",
                                            "c": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"a": a, "b": b, "c": c}


def test_reader_reads_by_name_across_shards(tmp_path):
    tensors = _sharded(tmp_path)
    reader = LazyHFCheckpoint(tmp_path)
    assert sorted(reader.keys()) == ["a", "b", "c"]
    assert reader.dtype_of("c") == torch.bfloat16 and reader.shape_of("a") == (3, 4)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())
    with pytest.raises(KeyError, match="'z' is not in the checkpoint"):
        reader.get("z")


def test_mapped_reads_equal_reads_and_writes_stay_private(tmp_path):
    tensors = _sharded(tmp_path)
    big = torch.randn(3000, 7, generator=torch.Generator().manual_seed(1))  # crosses pages, starts off a page
    save_file({"pad": torch.ones(3), "big": big}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {"a": index["weight_map"]["a"], "b": index["weight_map"]["b"],
                           "pad": "model-00002-of-00002.safetensors", "big": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = {"a": tensors["a"], "b": tensors["b"], "pad": torch.ones(3), "big": big}
    before = (tmp_path / "model-00002-of-00002.safetensors").read_bytes()
    reader = LazyHFCheckpoint(tmp_path)
    for name, tensor in tensors.items():
        mapped = reader.get_mapped(name)
        assert mapped.dtype == tensor.dtype and torch.equal(mapped, tensor), name
    mapped = reader.get_mapped("big")
    mapped.mul_(2)  # copy-on-write: the file and a fresh read are unchanged
    assert torch.equal(mapped, 2 * big) and torch.equal(reader.get_mapped("big"), big)
    assert (tmp_path / "model-00002-of-00002.safetensors").read_bytes() == before


def test_reader_names_truncated_file(tmp_path):
    _sharded(tmp_path)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated safetensors file .*model-00001-of-00002"):
        LazyHFCheckpoint(tmp_path)


def test_reader_names_unreadable_and_missing_files(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="unreadable safetensors file .*model-00002"):
        LazyHFCheckpoint(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors is listed in the checkpoint index"):
        LazyHFCheckpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        LazyHFCheckpoint(tmp_path / "empty")


class Payload:
    pass


def test_reader_loads_bin_with_weights_only(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(LazyHFCheckpoint(tmp_path).get("w"), torch.ones(2))
    torch.save({"w": Payload()}, tmp_path / "pytorch_model.bin")  # arbitrary pickled objects must not load
    with pytest.raises(ValueError, match="unreadable PyTorch checkpoint"):
        LazyHFCheckpoint(tmp_path)


def test_reader_prefers_weight_files_in_transformers_order(tmp_path):
    """transformers' save_pretrained of a smaller model into a sharded directory removes the old shards but leaves
    their index: transformers reads model.safetensors first (then the index, then the .bin forms); so does this."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bridge_convert.testing import save_tiny_hf_checkpoint

    save_tiny_hf_checkpoint(tmp_path, "llama", seed=0, max_shard_size="150KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(tmp_path))
    model.save_pretrained(tmp_path, max_shard_size="50MB")  # one file now, the old index stays
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.safetensors.index.json").exists()
    reader = LazyHFCheckpoint(tmp_path)
    expected = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert set(reader.weight_map.values()) == {"model.safetensors"} and reader.index_file is None
    assert all(torch.equal(reader.get(n), expected[n]) for n in reader.keys())
    assert SourceLayout.from_checkpoint(tmp_path).index_text is None
    (tmp_path / "model.safetensors").unlink()  # the index names shards that are gone now
    with pytest.raises(FileNotFoundError, match="listed in the checkpoint index but missing"):
        LazyHFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text('{"weight_map": {"v": "pytorch_model-00001.bin"}}')
    assert list(LazyHFCheckpoint(tmp_path).keys()) == ["w"]


def test_writer_reproduces_source_files_byte_for_byte_in_any_order(tmp_path):
    (tmp_path / "src").mkdir()
    tensors = _sharded(tmp_path / "src")
    layout = SourceLayout.from_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedSafetensorsWriter.from_source(out, layout)
    writer.add("c", tensors["c"])
    assert (out / "model-00002-of-00002.safetensors").exists()  # complete as soon as its tensors are in
    writer.add("b", tensors["b"])
    writer.add("a", tensors["a"])
    assert writer.close() == layout.weight_map
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    again = SourceLayout.from_json(json.loads(json.dumps(layout.to_json())))
    assert again.weight_map == layout.weight_map and again.dtypes["c"] == torch.bfloat16


def test_writer_rejects_foreign_duplicate_misshapen_and_missing_tensors(tmp_path):
    plan = FilePlan.build("f.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))], {})
    writer = ShardedSafetensorsWriter(tmp_path, [plan], None)
    with pytest.raises(ValueError, match="'z' has no place"):
        writer.add("z", torch.ones(1))
    with pytest.raises(ValueError, match=r"'a' is torch.bfloat16\(2,\), the layout expects torch.float32\(2,\)"):
        writer.add("a", torch.ones(2, dtype=torch.bfloat16))
    writer.add("a", torch.ones(2))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("a", torch.ones(2))
    with pytest.raises(ValueError, match=r"missing 1 tensors of the planned layout: \['b'\]"):
        writer.close()


def test_writer_shards_by_size_like_save_pretrained(tmp_path):
    specs = [(f"t{i}", torch.float32, (10,)) for i in range(5)]  # 40 bytes each: 2 per 100-byte shard
    writer = ShardedSafetensorsWriter.by_size(tmp_path, specs, max_shard_size=100)
    values = {name: torch.full((10,), float(i)) for i, (name, _, _) in enumerate(specs)}
    for name in reversed(list(values)):
        writer.add(name, values[name])
    weight_map = writer.close()
    assert sorted(set(weight_map.values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == 200
    for file in set(weight_map.values()):  # readable by safetensors itself
        loaded = load_file(str(tmp_path / file))
        assert all(torch.equal(loaded[n], values[n]) for n in loaded)
    single = tmp_path / "single"
    single.mkdir()
    writer = ShardedSafetensorsWriter.by_size(single, [("t", torch.bfloat16, (3,))])
    writer.add("t", torch.zeros(3, dtype=torch.bfloat16))
    assert writer.close() == {"t": "model.safetensors"}
    assert not (single / "model.safetensors.index.json").exists()
    assert torch.equal(load_file(str(single / "model.safetensors"))["t"], torch.zeros(3, dtype=torch.bfloat16))


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("150KB", 150_000), ("2GiB", 2 * 2**30), (7, 7)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_write_bytes_copies_mapped_tensors_in_the_kernel_and_writes_the_rest(tmp_path, monkeypatch):
    import errno
    import gc
    import os

    from bridge_convert import safetensors_io as sio

    payload = torch.randn(1 << 19, generator=torch.Generator().manual_seed(3))  # 2 MiB: above the 1 MiB floor
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 64 + payload.numpy().tobytes())
    copies = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: copies.append(a[2]) or real(*a))
    mapped = sio.mapped_tensor(src, 64, torch.float32, tuple(payload.shape))
    fresh = payload.clone() * 2
    with open(tmp_path / "out.bin", "wb") as out:
        out.write(b"head")
        assert sio.write_bytes(out, memoryview(mapped.numpy())) == payload.nbytes
        assert sio.write_bytes(out, memoryview(fresh.numpy())) == payload.nbytes  # fresh memory: plain write
        out.write(b"tail")
    data = (tmp_path / "out.bin").read_bytes()
    assert copies and sum(copies) == payload.nbytes  # only the mapped tensor went through the kernel copy
    assert data == b"head" + payload.numpy().tobytes() + fresh.numpy().tobytes() + b"tail"

    def refuse(*a):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)  # a file system pair that cannot copy: written instead
    with open(tmp_path / "out2.bin", "wb") as out:
        sio.write_bytes(out, memoryview(mapped.numpy()))
    assert (tmp_path / "out2.bin").read_bytes() == payload.numpy().tobytes()
    address = mapped.data_ptr()
    del mapped
    gc.collect()
    assert sio._file_region(address, payload.nbytes) is None  # unmapped: forgotten
