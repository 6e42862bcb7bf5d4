"""Lazy reader and streaming writer on real files written by safetensors / torch."""

import json

import pytest
import torch
from safetensors.torch import save_file

from bridge_convert.safetensors_io import (
    LazyHFCheckpoint,
    ShardedSafetensorsWriter,
    atomic_output_dir,
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
    assert not reader._handles  # nothing opened until a tensor is read
    assert torch.equal(reader.get("c"), tensors["c"])
    assert list(reader._handles) == ["model-00002-of-00002.safetensors"]
    with pytest.raises(KeyError, match="'z' is not in the checkpoint"):
        reader.get("z")


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


def test_writer_reproduces_source_layout_whatever_the_order(tmp_path):
    (tmp_path / "src").mkdir()
    tensors = _sharded(tmp_path / "src")
    layout = LazyHFCheckpoint(tmp_path / "src").weight_map
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardedSafetensorsWriter(out, layout=layout, write_index=True)
    writer.add("c", tensors["c"])
    assert (out / "model-00002-of-00002.safetensors").exists()  # written as soon as complete
    writer.add("b", tensors["b"])
    assert not (out / "model-00001-of-00002.safetensors").exists()
    writer.add("a", tensors["a"])
    assert writer.close() == layout
    again = LazyHFCheckpoint(out)
    assert again.weight_map == layout and all(torch.equal(again.get(n), t) for n, t in tensors.items())


def test_writer_rejects_incomplete_or_foreign_tensors(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, layout={"a": "f.safetensors", "b": "f.safetensors"})
    with pytest.raises(ValueError, match="'z' has no place"):
        writer.add("z", torch.ones(1))
    writer.add("a", torch.ones(1))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("a", torch.ones(1))
    with pytest.raises(ValueError, match=r"missing 1 tensors of the source layout: \['b'\]"):
        writer.close()


def test_writer_shards_by_size_like_save_pretrained(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_size=100)
    for i in range(5):
        writer.add(f"t{i}", torch.zeros(10))  # 40 bytes each: 2 per shard
    weight_map = writer.close()
    assert sorted(set(weight_map.values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == 200
    single = tmp_path / "single"
    single.mkdir()
    writer = ShardedSafetensorsWriter(single)
    writer.add("t", torch.zeros(3))
    assert writer.close() == {"t": "model.safetensors"}
    assert not (single / "model.safetensors.index.json").exists()


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(target) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old").write_text("1")
    with atomic_output_dir(target) as tmp:
        (tmp / "new").write_text("2")
    assert [p.name for p in target.iterdir()] == ["new"] and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FileExistsError, match="not empty"), atomic_output_dir(target, overwrite=False):
        pass


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("150KB", 150_000), ("2GiB", 2 * 2**30), (7, 7)])
def test_parse_size(text, value):
    assert parse_size(text) == value
