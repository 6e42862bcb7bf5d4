"""Offline conversion's fast paths: HF tensors as row ranges of the stored chunks and megatron chunks as row ranges
of the HF tensors, copied file to file (``copy_file_range``), and the checkpoint metadata read without importing
torch.distributed.checkpoint."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bridge_convert import AutoBridge
from bridge_convert.mappings import QKV, Direct, GatedMLP, MappingContext
from bridge_convert.offline import export_megatron_checkpoint, import_hf_checkpoint
from bridge_convert.offline.row_blocks import _runs, row_blocks
from bridge_convert.testing import assert_same_checkpoint


def _data_bytes(path) -> int:
    return sum(t.nbytes for f in Path(path).glob("*.safetensors") for t in load_file(str(f)).values())


def _count_kernel_copies(monkeypatch) -> list[int]:
    """Every byte count ``copy_file_range`` copies from now on (and no size threshold: tiny tensors too)."""
    from bridge_convert import safetensors_io

    copied = []
    real_copy = os.copy_file_range

    def counting_copy(src, dst, count, offset_src=None, offset_dst=None):
        n = real_copy(src, dst, count, offset_src, offset_dst)
        copied.append(n)
        return n

    monkeypatch.setattr(safetensors_io, "_KERNEL_COPY_MIN", 1)  # the tiny model's row blocks are a few KiB
    monkeypatch.setattr(os, "copy_file_range", counting_copy)
    return copied


@pytest.mark.parametrize("family,kv_heads", [("llama", 4), ("llama", 1), ("qwen2", 2)])  # MHA, MQA, GQA + bias
def test_export_copies_every_tensor_file_to_file_and_matches_the_model_building_export(
        family, kv_heads, tiny_hf_checkpoint, tmp_path, monkeypatch, runtime):
    hf = tiny_hf_checkpoint(family, num_key_value_heads=kv_heads, dtype=torch.bfloat16)
    megatron = import_hf_checkpoint(hf, tmp_path / "mc", progress=False).parent
    copied = _count_kernel_copies(monkeypatch)
    export_megatron_checkpoint(megatron, tmp_path / "offline", progress=False)
    monkeypatch.undo()
    assert_same_checkpoint(hf, tmp_path / "offline")
    assert sum(copied) == _data_bytes(hf)  # Q / K / V, gate / up and the rest: no byte through write()
    AutoBridge.export_ckpt(megatron, tmp_path / "built", offline=False)
    for file in sorted((tmp_path / "built").glob("*.safetensors")):
        assert (tmp_path / "offline" / file.name).read_bytes() == file.read_bytes(), file.name


def test_export_to_another_dtype_converts_the_row_blocks(tiny_hf_checkpoint, tmp_path):
    hf = tiny_hf_checkpoint("qwen2", num_key_value_heads=1)  # fp32 source, bf16 out: every byte changes
    megatron = import_hf_checkpoint(hf, tmp_path / "mc", progress=False).parent
    export_megatron_checkpoint(megatron, tmp_path / "bf16", dtype="bfloat16", progress=False)
    source = {k: v for f in Path(hf).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    exported = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert sorted(exported) == sorted(source)
    for name, tensor in source.items():
        assert exported[name].dtype == torch.bfloat16, name
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name


def _ctx(heads: int, groups: int, head_dim: int) -> MappingContext:
    return MappingContext(num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim, hidden_size=8,
                          vocab_size=16)


@pytest.mark.parametrize("heads,groups,head_dim", [(8, 2, 4), (4, 4, 2), (6, 1, 3)])
def test_row_blocks_of_row_split_chunks_are_the_hf_tensors(heads, groups, head_dim):
    """A fused QKV weight stored in two row chunks (a TP=2 save holds whole query groups per rank, here split
    anywhere): the blocks of each HF tensor, concatenated, are the q / k / v it was fused from."""
    from types import SimpleNamespace

    from bridge_convert.offline.layout import CheckpointEntry
    from bridge_convert.offline.row_blocks import hf_row_runs

    generator = torch.Generator().manual_seed(heads * 10 + groups)
    mapping = QKV("decoder.layers.*.self_attention.linear_qkv.weight", q="q.*", k="k.*", v="v.*")
    hf = [torch.randn(rows * head_dim, 8, generator=generator) for rows in (heads, groups, groups)]
    fused = mapping.to_megatron(hf, _ctx(heads, groups, head_dim))
    cfg = SimpleNamespace(num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim,
                          hidden_size=8, vocab_size=16)
    entry = CheckpointEntry("decoder.layers.self_attention.linear_qkv.weight", mapping, True)
    runs = hf_row_runs(entry, cfg, tuple(fused.shape))
    cut = fused.shape[0] // 2 + 1
    stored = fused.unsqueeze(0)
    pieces = [((0, cut, 0), stored[:, cut:].clone()), ((0, 0, 0), stored[:, :cut].clone())]
    blocks = row_blocks(runs, pieces, tuple(stored.shape), layered=True)
    for want, tensor_blocks in zip(hf, blocks):
        assert all(b.is_contiguous() for b in tensor_blocks)
        torch.testing.assert_close(torch.cat(tensor_blocks), want, rtol=0, atol=0)
    split_by_columns = [((0, 0, 0), stored[:, :, :4].clone()), ((0, 0, 4), stored[:, :, 4:].clone())]
    assert row_blocks(runs, split_by_columns, tuple(stored.shape), layered=True) is None  # assembled instead


def test_runs_of_a_gated_mlp_and_a_direct_weight():
    from types import SimpleNamespace

    from bridge_convert.offline.layout import CheckpointEntry
    from bridge_convert.offline.row_blocks import hf_row_runs

    cfg = SimpleNamespace(num_attention_heads=2, num_query_groups=2, kv_channels=4, hidden_size=8, vocab_size=16)
    gated = CheckpointEntry("fc1", GatedMLP("fc1", gate="g", up="u"), False)
    assert hf_row_runs(gated, cfg, (10, 8)) == [[(0, 5)], [(5, 10)]]
    assert hf_row_runs(CheckpointEntry("n", Direct("n", "n"), False), cfg, (8,)) == [[(0, 8)]]
    assert _runs(torch.tensor([3, 4, 5, 0, 1, 9]).numpy()) == [(3, 6), (0, 2), (9, 10)]


def test_metadata_read_without_dcp_equals_dcps_own_reading(tiny_hf_checkpoint, tmp_path, monkeypatch, runtime):
    import subprocess
    import sys

    from torch.distributed.checkpoint import FileSystemReader

    from bridge_convert.offline import dcp_metadata

    hf = tiny_hf_checkpoint("qwen3")
    offline = import_hf_checkpoint(hf, tmp_path / "offline", progress=False)
    built = AutoBridge.import_ckpt(hf, tmp_path / "built", offline=False)  # megatron-core's own save
    for directory in (offline, built):
        by_dcp = dcp_metadata._records(FileSystemReader(str(directory)).read_metadata())
        assert dcp_metadata.read_metadata(directory) == by_dcp
        assert len(by_dcp.tensors) > 5 and by_dcp.objects and len(by_dcp.storage) > len(by_dcp.tensors)
        monkeypatch.setattr(dcp_metadata, "_ALLOWED", set())  # a pickle naming globals it does not know
        assert dcp_metadata.read_metadata(directory) == by_dcp  # ... is read by DCP itself
        monkeypatch.undo()
    probe = ("import sys; from bridge_convert.offline.dcp_metadata import read_metadata; "
             f"read_metadata({str(offline)!r}); print('torch.distributed.checkpoint' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_import_writes_every_chunk_from_the_hf_bytes_and_no_record_with_a_wrong_crc(tiny_hf_checkpoint, tmp_path,
                                                                                    monkeypatch):
    """The fused QKV chunk is saved from the mapped q / k / v rows (never built) by the kernel; the zip records
    hold no CRC-32 (switched off in the writer threads), so none is computed over the stand-in's unwritten bytes."""
    import io
    import zipfile
    import zlib

    from bridge_convert.offline.dcp_metadata import read_metadata

    hf = tiny_hf_checkpoint("qwen2", num_key_value_heads=1)
    copied = _count_kernel_copies(monkeypatch)
    directory = import_hf_checkpoint(hf, tmp_path / "mc", threads=2, progress=False)
    monkeypatch.undo()
    assert sum(copied) == _data_bytes(hf)
    records = 0
    for (key, offsets), where in read_metadata(directory).storage.items():
        if offsets is None:
            continue
        with open(directory / where.relative_path, "rb") as f:
            f.seek(where.offset)
            archive = zipfile.ZipFile(io.BytesIO(f.read(where.length)))
        for info in archive.infolist():
            if info.filename.endswith("/data/0"):
                with archive.open(info) as record:
                    record._expected_crc = None  # read the bytes whatever the stored CRC says
                    data = record.read()
                assert info.CRC in (0, zlib.crc32(data)), key
                records += 1
    assert records > 10


def test_import_rewrites_a_chunk_that_torch_save_did_not_write_from_the_stand_in(tiny_hf_checkpoint, tmp_path,
                                                                                 monkeypatch):
    """A torch whose save copies a storage before writing it would hand the writer bytes outside the stand-in
    (simulated: every address looks foreign): each such chunk is written again from its built tensor, so the
    checkpoint still holds the HF weights (checked by exporting it back)."""
    from bridge_convert.offline import dist_ckpt

    hf = tiny_hf_checkpoint("llama", num_key_value_heads=2)
    monkeypatch.setattr(dist_ckpt, "buffer_address", lambda view: 0)  # below the stand-in: "not its memory"
    megatron = import_hf_checkpoint(hf, tmp_path / "mc", progress=False).parent
    monkeypatch.undo()
    export_megatron_checkpoint(megatron, tmp_path / "back", progress=False)
    assert_same_checkpoint(hf, tmp_path / "back")


_FAST_IMPORT = """
import sys
from bridge_convert.offline import import_hf_checkpoint
from bridge_convert.offline.dcp_write import can_write_metadata
assert can_write_metadata(), "this torch is not one dcp_write was checked against"
import_hf_checkpoint(sys.argv[1], sys.argv[2], progress=False)
print("dcp imported:", "torch.distributed.checkpoint" in sys.modules)
"""


def test_metadata_written_without_dcp_is_what_dcps_own_save_writes(tiny_hf_checkpoint, tmp_path):
    """For the installed torch (dcp_write.VERIFIED_TORCH): an import in a fresh process writes ``.metadata``
    without importing DCP, and DCP reads from it objects equal to those of its own save of the same items (layer-
    stacked tensors of several chunks, whole tensors with strides, megatron-core's objects); megatron-core then
    loads it (the offline import above equals the model-building one)."""
    import subprocess
    import sys

    from torch.distributed.checkpoint import FileSystemReader

    hf = tiny_hf_checkpoint("qwen3", num_key_value_heads=2)
    done = subprocess.run([sys.executable, "-c", _FAST_IMPORT, hf, str(tmp_path / "fast")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dcp imported: False" in done.stdout
    own = import_hf_checkpoint(hf, tmp_path / "own", progress=False)  # DCP is imported here: its own save
    fast, reference = (FileSystemReader(str(d)).read_metadata() for d in (tmp_path / "fast" / own.name, own))
    assert fast.state_dict_metadata == reference.state_dict_metadata
    assert fast.storage_data == reference.storage_data
    assert [i.index for i in fast.storage_data] == [i.index for i in reference.storage_data]  # index: compare=False
    assert (fast.planner_data, fast.version, fast.storage_meta.modules) == \
        (reference.planner_data, reference.version, reference.storage_meta.modules)
    assert type(fast.storage_meta.checkpoint_id) is type(reference.storage_meta.checkpoint_id)
    assert fast.storage_meta.checkpoint_id.name == reference.storage_meta.checkpoint_id.name
    assert len(fast.storage_meta.save_id) == len(reference.storage_meta.save_id)
    export_megatron_checkpoint(tmp_path / "fast", tmp_path / "back", progress=False)
    assert_same_checkpoint(hf, tmp_path / "back")
