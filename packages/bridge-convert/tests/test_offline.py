"""Offline conversion against the model-building path (megatron-core's own save and load) and transformers."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from bridge_convert import AutoBridge
from bridge_convert.forward import forward_logits
from bridge_convert.megatron_ckpt import save_checkpoint
from bridge_convert.offline import export_megatron_checkpoint, import_hf_checkpoint
from bridge_convert.runtime import initialize_parallel
from bridge_convert.testing import FAMILIES, assert_same_checkpoint, run_multiprocess

SEQ = 16


def _input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(5))


def _hf_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_input_ids()).logits.float()


def _load(path, **layout) -> list:
    """A megatron-core model built at ``layout`` and loaded from the checkpoint by megatron-core."""
    bridge = AutoBridge.from_megatron_checkpoint(path)
    model = bridge.to_megatron_model(load_weights=False, wrap_with_ddp=False, params_dtype=torch.float32,
                                     perform_initialization=False, **layout)
    bridge.load_megatron_checkpoint(model, path)
    return model


def _layout(path) -> dict:
    """Keys -> (global shape, dtype, chunks) of the tensors, plus the object keys, of a torch_dist checkpoint."""
    md = FileSystemReader(str(Path(path) / "iter_0000000")).read_metadata()
    out = {}
    for key, item in md.state_dict_metadata.items():
        if hasattr(item, "chunks"):
            chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in item.chunks)
            out[key] = (tuple(item.size), item.properties.dtype, item.properties.strides, chunks)
        else:
            out[key] = "object"
    return out


@pytest.fixture(scope="module")
def offline_checkpoints(hf_checkpoints, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("offline")
    return {family: str(import_hf_checkpoint(path, root / family, progress=False).parent)
            for family, path in hf_checkpoints.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_offline_import_equals_the_model_building_import(family, hf_checkpoints, offline_checkpoints, tmp_path,
                                                         runtime):
    built = AutoBridge.import_ckpt(hf_checkpoints[family], tmp_path / "built", offline=False).parent
    offline = offline_checkpoints[family]
    assert _layout(offline) == _layout(built)  # the keys, shapes, dtypes and chunks megatron-core itself writes
    from_offline = _load(offline)[0].state_dict()
    from_built = _load(built)[0].state_dict()
    assert sorted(from_offline) == sorted(from_built)
    for name, value in from_built.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(from_offline[name], value), name
    logits = forward_logits(_load(offline), _input_ids())
    assert (logits - _hf_logits(hf_checkpoints[family])).abs().max().item() <= 1e-4
    exported = tmp_path / "hf"
    export_megatron_checkpoint(offline, exported, progress=False)
    assert_same_checkpoint(hf_checkpoints[family], exported)
    source_config = json.loads((Path(hf_checkpoints[family]) / "config.json").read_text())
    assert json.loads((exported / "config.json").read_text()) == source_config


def _parallel_body(checkpoints: dict[str, str], reference: dict[str, torch.Tensor], out: str, saved_tp2: str
                   ) -> dict[str, float]:
    initialize_parallel()
    # Called from every rank of a job, an offline conversion runs once (rank 0) and all ranks share its outcome.
    AutoBridge.export_ckpt(checkpoints["qwen2"], out)
    try:
        AutoBridge.export_ckpt(checkpoints["qwen2"], out)
        raise AssertionError("a second export into a non-empty directory must fail on every rank")
    except ValueError as exc:
        assert "is not empty" in str(exc)
    diffs = {}
    for tp, pp in ((2, 1), (1, 2)):  # the provider rebuilds megatron-core's groups for each layout
        for family, path in checkpoints.items():
            model = _load(path, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            if family == "qwen2" and tp == 2:  # megatron-core's own save at TP=2: chunks split by rows and columns
                AutoBridge.from_megatron_checkpoint(path).save_megatron_checkpoint(model, saved_tp2)
            diffs[f"{family} tp{tp} pp{pp}"] = (forward_logits(model, _input_ids()) - reference[family]).abs().max().item()
    return diffs


@pytest.mark.multiproc
def test_offline_checkpoints_load_at_tp2_and_pp2(hf_checkpoints, offline_checkpoints, tmp_path):
    families = ("llama32", "qwen2", "qwen3", "mistral")  # tied embeddings, QKV bias, q/k norm + head_dim, GQA
    reference = {f: _hf_logits(hf_checkpoints[f]) for f in families}
    checkpoints = {f: offline_checkpoints[f] for f in families}
    diffs = run_multiprocess(_parallel_body, 2, checkpoints, reference, str(tmp_path / "hf"),
                             str(tmp_path / "tp2"), timeout=600)[0]
    assert_same_checkpoint(hf_checkpoints["qwen2"], tmp_path / "hf")
    from bridge_convert.offline.dcp_metadata import read_metadata

    qkv = read_metadata(tmp_path / "tp2" / "iter_0000000").tensors["decoder.layers.self_attention.linear_qkv.weight"]
    assert len(qkv.chunks) == 2 * 2  # two layers, each in two row chunks (one per TP rank)
    export_megatron_checkpoint(tmp_path / "tp2", tmp_path / "hf-from-tp2", progress=False)
    assert_same_checkpoint(hf_checkpoints["qwen2"], tmp_path / "hf-from-tp2")  # Q / K / V rows across the chunks
    assert len(diffs) == 2 * len(families)
    assert all(d <= 1e-4 for d in diffs.values()), diffs


def test_offline_export_of_a_training_checkpoint_matches_the_model_building_export(hf_checkpoints, tmp_path,
                                                                                   runtime):
    from megatron.core.dist_checkpointing import ShardedTensor

    bridge = AutoBridge.from_hf_pretrained(hf_checkpoints["qwen3"])
    model = bridge.to_megatron_model(load_weights=True, wrap_with_ddp=False, params_dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training" moved every weight
        for param in model[0].parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))
    root = tmp_path / "train"
    state = torch.randn(64, generator=generator)
    for iteration in (10, 20):
        optimizer = {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.exp_avg.final_norm", state.clone())}
        save_checkpoint(model, root, iteration=iteration, metadata=bridge.checkpoint_metadata(model),
                        extra_state={"optimizer": optimizer}, hf_assets_from=bridge.hf_path)
    AutoBridge.export_ckpt(root, tmp_path / "built", offline=False)
    AutoBridge.export_ckpt(root, tmp_path / "offline")
    built = sorted(p.name for p in (tmp_path / "built").iterdir())
    assert built == sorted(p.name for p in (tmp_path / "offline").iterdir())
    for name in built:
        assert (tmp_path / "offline" / name).read_bytes() == (tmp_path / "built" / name).read_bytes(), name
    AutoBridge.export_ckpt(root, tmp_path / "bf16", dtype="bfloat16")  # not the source layout: sharded by size
    exported = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert exported.get("dtype", exported.get("torch_dtype")) == "bfloat16"  # the dtype the tensors have
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    from megatron.core.utils import unwrap_model

    weight = unwrap_model(model[0]).decoder.final_layernorm.weight.detach()
    assert torch.equal(tensors["model.norm.weight"], weight)


def test_a_given_max_shard_size_cuts_the_files_even_where_the_source_layout_matches(hf_checkpoints,
                                                                                   offline_checkpoints, tmp_path,
                                                                                   runtime):
    from safetensors import safe_open

    def files(path) -> dict[str, list[str]]:
        return {f.name: sorted(safe_open(str(f), "pt").keys()) for f in sorted(Path(path).glob("*.safetensors"))}

    source = hf_checkpoints["llama"]
    for options in ({"dtype": "bfloat16"}, {}):  # the two paths write the same bytes (the last: kept for below)
        shutil.rmtree(tmp_path, ignore_errors=True)
        AutoBridge.export_ckpt(offline_checkpoints["llama"], tmp_path / "offline", max_shard_size="40KB", **options)
        AutoBridge.export_ckpt(offline_checkpoints["llama"], tmp_path / "built", max_shard_size="40KB", offline=False,
                               **options)
        names = sorted(p.name for p in (tmp_path / "built").iterdir())
        assert names == sorted(p.name for p in (tmp_path / "offline").iterdir()) and len(names) > 4
        for name in names:
            assert (tmp_path / "offline" / name).read_bytes() == (tmp_path / "built" / name).read_bytes(), name
    cut = files(tmp_path / "offline")
    assert len(cut) > len(files(source))
    for name, keys in cut.items():
        if len(keys) > 1:
            assert (tmp_path / "offline" / name).stat().st_size <= 40_000 + 4096, name  # + the header
    _, by_file = json.loads((tmp_path / "offline" / "model.safetensors.index.json").read_text()).values()
    assert {k: by_file[k] for ks in cut.values() for k in ks} == by_file  # the index names the new files
    from safetensors.torch import load_file

    original = {k: v for f in Path(source).glob("*.safetensors") for k, v in load_file(str(f)).items()}
    exported = {k: v for f in (tmp_path / "offline").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert original.keys() == exported.keys()
    for name, tensor in original.items():  # in the source dtype, bit for bit
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    torch.testing.assert_close(_hf_logits(tmp_path / "offline"), _hf_logits(source), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bad input
def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def _nothing_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _rewrite_shard(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"truncated safetensors file .*model-00003-of-00003\.safetensors"),
    ("header", r"unreadable safetensors file .*model-00001-of-00003\.safetensors"),
    ("missing", r"is missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    ("shape", r"wrong shape: model\.layers\.0\.self_attn\.o_proj\.weight \[64, 32\] make "
              r"decoder\.layers\.self_attention\.linear_proj\.weight \[64, 32\], the config .* needs \[64, 64\]"),
    ("architecture", r"unsupported architecture 'GPT2LMHeadModel'"),
    ("nan", r"non-finite \(NaN / inf\) values in 1 tensors: model\.layers\.0\.mlp\.down_proj\.weight"),
])
def test_bad_hf_input_is_one_clear_error_and_leaves_nothing(damage, message, hf_checkpoints, tmp_path):
    hf = _copy(hf_checkpoints["llama"], tmp_path / "hf")
    shards = _shards(hf)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    if damage == "truncate":
        data = shards[-1].read_bytes()
        shards[-1].write_bytes(data[:-100])
    elif damage == "header":
        data = shards[0].read_bytes()
        shards[0].write_bytes((2**40).to_bytes(8, "little") + data[8:])
    elif damage == "missing":
        name = "model.layers.1.mlp.up_proj.weight"
        _rewrite_shard(hf / index["weight_map"].pop(name), lambda t: t.pop(name))
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "shape":
        name = "model.layers.0.self_attn.o_proj.weight"
        _rewrite_shard(hf / index["weight_map"][name], lambda t: t.update({name: torch.randn(64, 32)}))
    elif damage == "architecture":
        config = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    elif damage == "nan":
        name = "model.layers.0.mlp.down_proj.weight"
        _rewrite_shard(hf / index["weight_map"][name], lambda t: t[name].view(-1).__setitem__(7, float("nan")))
    with pytest.raises(ValueError, match=message):
        import_hf_checkpoint(hf, tmp_path / "mc", progress=False)
    _nothing_left(tmp_path, "mc")


def test_full_disk_on_import_names_the_output_and_leaves_nothing(hf_checkpoints, tmp_path, monkeypatch):
    import errno

    from bridge_convert.offline import dist_ckpt
    from bridge_convert.outputs import OutputError

    def full_disk(directory, *args):  # the disk fills up part-way through the first data file
        (directory / f"{dist_ckpt.DATA_FILE_PREFIX}0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dist_ckpt, "_write_data_files", full_disk)
    with pytest.raises(OutputError, match=r"no space left on the device of .*mc; it needs .* KiB"):
        import_hf_checkpoint(hf_checkpoints["llama"], tmp_path / "mc", progress=False)
    _nothing_left(tmp_path, "mc")


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"truncated checkpoint data file .*__0_0\.distcp"),
    ("metadata", r"unreadable checkpoint metadata .*\.metadata"),
    ("architecture", r"has no tensor 'decoder\.layers\.self_attention\.q_layernorm\.weight'"),
    ("layers", r"decoder\.layers\.self_attention\.linear_qkv\.layer_norm_weight stacks 2 layers, the config has "
               r"num_hidden_layers=3"),
])
def test_bad_megatron_input_is_one_clear_error_and_leaves_nothing(damage, message, offline_checkpoints, tmp_path):
    root = _copy(offline_checkpoints["llama"], tmp_path / "mc")
    iteration = root / "iter_0000000"
    bridge_json = json.loads((iteration / "bridge.json").read_text())
    if damage == "truncate":
        data = (iteration / "__0_0.distcp").read_bytes()
        (iteration / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    elif damage == "metadata":
        (iteration / ".metadata").write_bytes((iteration / ".metadata").read_bytes()[:50])
    elif damage == "architecture":
        bridge_json["hf_config"].update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
        bridge_json["architecture"] = "Qwen3ForCausalLM"
    elif damage == "layers":
        bridge_json["hf_config"]["num_hidden_layers"] = 3
    (iteration / "bridge.json").write_text(json.dumps(bridge_json))
    with pytest.raises(ValueError, match=message):
        export_megatron_checkpoint(root, tmp_path / "hf", progress=False)
    _nothing_left(tmp_path, "hf")


def test_import_dtype_and_a_second_run_refuses(hf_checkpoints, tmp_path):
    out = tmp_path / "mc"
    import_hf_checkpoint(hf_checkpoints["mistral"], out, dtype="bfloat16", progress=False)
    layout = _layout(out)
    assert {v[1] for v in layout.values() if v != "object"} == {torch.bfloat16}
    meta = json.loads((out / "iter_0000000" / "bridge.json").read_text())
    saved = meta["hf_config"]
    assert meta["params_dtype"] == "bfloat16" and saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    with pytest.raises(ValueError, match="is not empty .* pass --overwrite"):
        import_hf_checkpoint(hf_checkpoints["mistral"], out, progress=False)
    import_hf_checkpoint(hf_checkpoints["mistral"], out, overwrite=True, progress=False)
    assert {v[1] for v in _layout(out).values() if v != "object"} == {torch.float32}


def test_a_region_of_several_chunks_is_assembled_into_the_given_buffer():
    from bridge_convert.offline.dist_ckpt import assemble_region

    generator = torch.Generator().manual_seed(5)
    whole = torch.randn(6, 4, generator=generator)
    pieces = [((0, 0), whole[:2].clone()), ((2, 0), whole[2:].clone())]
    buffer = torch.full((6, 4), float("nan"))
    assert assemble_region(pieces, (6, 4), out=buffer) is buffer  # the caller's reused pages, not a new tensor
    torch.testing.assert_close(buffer, whole, rtol=0, atol=0)
    torch.testing.assert_close(assemble_region(pieces, (6, 4)), whole, rtol=0, atol=0)
    assert assemble_region(pieces[:1], (2, 4)) is pieces[0][1]  # one chunk: no copy
    with pytest.raises(ValueError, match="a buffer"):
        assemble_region(pieces, (6, 4), out=torch.empty(6, 5))


def _virtual_pipeline_body(hf_path: str, offline_path: str, saved: str, hf_out: str) -> dict[str, float]:
    initialize_parallel()
    layout = dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    reference = _hf_logits(hf_path)
    bridge = AutoBridge.from_hf_pretrained(hf_path)
    built = bridge.to_megatron_model(wrap_with_ddp=False, params_dtype=torch.float32, **layout)
    bridge.save_hf_pretrained(built, hf_out)
    assert len(built) == 2  # two model chunks per pipeline rank
    diffs = {"built": (forward_logits(built, _input_ids()) - reference).abs().max().item()}
    AutoBridge.from_megatron_checkpoint(offline_path).save_megatron_checkpoint(built, saved)
    loaded = _load(offline_path, **layout)
    diffs["offline"] = (forward_logits(loaded, _input_ids()) - reference).abs().max().item()
    return diffs


@pytest.mark.multiproc
def test_virtual_pipeline_layouts_load_and_export(tmp_path):
    """PP=2 x VP=2 over a 4-layer model (one layer per model chunk): the model-building import and megatron-core's
    load of the offline checkpoint give transformers' logits, and both the in-process export of the
    virtual-pipeline model and the offline export of the checkpoint megatron-core saves from it give the HF source."""
    from bridge_convert.testing import save_tiny_hf_checkpoint

    hf = save_tiny_hf_checkpoint(tmp_path / "hf", "llama", seed=11, num_hidden_layers=4)
    offline = import_hf_checkpoint(hf, tmp_path / "offline", progress=False).parent
    diffs = run_multiprocess(_virtual_pipeline_body, 2, hf, str(offline), str(tmp_path / "vp"),
                             str(tmp_path / "hf-from-built"), timeout=600)
    assert all(d <= 1e-4 for rank in diffs for d in rank.values()), diffs
    assert_same_checkpoint(hf, tmp_path / "hf-from-built")  # the in-process export from the VP chunks
    export_megatron_checkpoint(tmp_path / "vp", tmp_path / "hf-from-vp", progress=False)
    assert_same_checkpoint(hf, tmp_path / "hf-from-vp")


@pytest.mark.parametrize("same", [True, False], ids=["equal", "distinct"])
def test_a_stored_tied_lm_head_must_equal_the_embedding(same, hf_checkpoints, tmp_path, runtime):
    """With tie_word_embeddings the checkpoint's lm_head.weight is never read: one that differs from the embedding
    (an untied model whose config says tied) was dropped silently on both paths; transformers keeps it. A copy
    equal to the embedding converts as before."""
    from bridge_convert import CheckpointMismatchError

    hf = _copy(hf_checkpoints["llama32"], tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    embed = "model.embed_tokens.weight"
    shard = index["weight_map"][embed]
    _rewrite_shard(hf / shard, lambda t: t.update({"lm_head.weight": t[embed].clone() if same else t[embed] + 1}))
    index["weight_map"]["lm_head.weight"] = shard
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    bridge = AutoBridge.from_hf_pretrained(hf)
    if same:
        import_hf_checkpoint(hf, tmp_path / "mc", progress=False)
        bridge.to_megatron_model(load_weights=True)
        from safetensors.torch import load_file

        for offline in (True, False):  # re-cut by size, the stored copy is written too, next to the embedding
            AutoBridge.export_ckpt(tmp_path / "mc", tmp_path / f"cut-{offline}", max_shard_size="40KB",
                                   offline=offline)
            out = {k: v for f in (tmp_path / f"cut-{offline}").glob("*.safetensors") for k, v in load_file(f).items()}
            assert torch.equal(out["lm_head.weight"], out[embed])
        names = sorted(p.name for p in (tmp_path / "cut-True").iterdir())
        assert len(names) > 4 and names == sorted(p.name for p in (tmp_path / "cut-False").iterdir())
        for name in names:
            assert (tmp_path / "cut-True" / name).read_bytes() == (tmp_path / "cut-False" / name).read_bytes(), name
        return
    message = r"lm_head\.weight differs from model\.embed_tokens\.weight, but config\.json ties them"
    with pytest.raises(ValueError, match=message):
        import_hf_checkpoint(hf, tmp_path / "mc", progress=False)
    _nothing_left(tmp_path, "mc")
    with pytest.raises(CheckpointMismatchError, match=message):
        bridge.to_megatron_model(load_weights=True)
