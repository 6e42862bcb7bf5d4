"""AutoBridge's errors: each names what is wrong, and nothing is built or written half-way."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge_convert import AutoBridge, CheckpointMismatchError, safetensors_io
from bridge_convert.testing import save_tiny_hf_checkpoint


def _rewrite_shard(path, drop=(), add=None):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    file = index["weight_map"]["model.embed_tokens.weight"]
    tensors = load_file(str(path / file))
    for name in drop:
        tensors.pop(name)
        index["weight_map"].pop(name)
    for name, tensor in (add or {}).items():
        tensors[name] = tensor
        index["weight_map"][name] = file
    save_file(tensors, str(path / file), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPT2LMHeadModel'; supported: \[.*'LlamaForCausalLM'"):
        AutoBridge.from_hf_config({"architectures": ["GPT2LMHeadModel"]})
    assert AutoBridge.list_supported_models() == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                                  "Qwen3ForCausalLM"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_a_config_without_architectures_converts_by_its_model_type(family, hf_checkpoints, tmp_path, runtime):
    """transformers' auto classes pick the class by model_type; this said "HF config has no 'architectures'"."""
    import shutil

    from transformers import AutoModelForCausalLM

    from bridge_convert.testing import assert_same_checkpoint

    src = shutil.copytree(hf_checkpoints[family], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    architecture = config.pop("architectures")[0]
    (src / "config.json").write_text(json.dumps(config))
    assert type(AutoModelForCausalLM.from_pretrained(src)).__name__ == architecture  # the oracle's reading
    AutoBridge.import_ckpt(src, tmp_path / "mc")  # offline
    AutoBridge.export_ckpt(tmp_path / "mc", tmp_path / "offline")
    bridge = AutoBridge.from_hf_pretrained(src)
    bridge.save_hf_pretrained(bridge.to_megatron_model(load_weights=True), tmp_path / "built")
    for out in ("offline", "built"):
        assert_same_checkpoint(src, tmp_path / out)
        assert json.loads((tmp_path / out / "config.json").read_text())["architectures"] == [architecture]
    with pytest.raises(ValueError, match=r"names no architecture \('architectures'\) and model_type 'gpt2' is none"):
        AutoBridge.from_hf_config({"model_type": "gpt2"})


def test_missing_and_unexpected_tensors_are_named(tmp_path, runtime):
    path = tmp_path / "hf"
    save_tiny_hf_checkpoint(path, "llama")
    _rewrite_shard(path, drop=["model.embed_tokens.weight"], add={"model.extra.weight": torch.ones(2)})
    with pytest.raises(CheckpointMismatchError) as err:
        AutoBridge.from_hf_pretrained(path).to_megatron_model(load_weights=True)
    assert "missing tensors (1): model.embed_tokens.weight" in str(err.value)
    assert "unexpected tensors (1): model.extra.weight" in str(err.value)


def test_shape_mismatch_names_parameter_and_shapes(tmp_path, runtime):
    path = tmp_path / "hf"
    save_tiny_hf_checkpoint(path, "llama")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch for decoder.layers.0.mlp.linear_fc1.weight .*"
                                                      r"needs \(192, 64\) for the full tensor, the checkpoint gives "
                                                      r"\(256, 64\)"):
        AutoBridge.from_hf_pretrained(path).to_megatron_model(load_weights=True)


def test_heads_not_divisible_by_tp_fail_before_anything_is_built(hf_checkpoints, monkeypatch):
    import bridge_convert.provider as provider_module

    def no_runtime(*args, **kwargs):
        raise AssertionError("the runtime must not be initialised for an impossible layout")

    monkeypatch.setattr(provider_module, "initialize_parallel", no_runtime)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_model_parallel_size "
                                         r"\(3\).*\n.*num_query_groups \(2\)"):
        AutoBridge.from_hf_pretrained(hf_checkpoints["llama"]).to_megatron_model(tensor_model_parallel_size=3)


def test_unknown_provider_override_suggests_a_field(hf_checkpoints):
    with pytest.raises(ValueError, match="no field 'tensor_parallel_size'; did you mean 'tensor_model_parallel_size'"):
        AutoBridge.from_hf_pretrained(hf_checkpoints["llama"]).to_megatron_model(tensor_parallel_size=2)


def test_missing_directory_and_offline_hub_id(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="HF model directory not found"):
        AutoBridge.from_hf_pretrained(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not be fetched from the HF hub"):
        AutoBridge.from_hf_pretrained("meta-llama/Llama-3.2-1B")


def test_failed_export_leaves_no_output(hf_checkpoints, tmp_path, monkeypatch, runtime):
    bridge = AutoBridge.from_hf_pretrained(hf_checkpoints["qwen3"])
    model = bridge.to_megatron_model(load_weights=True)
    original = safetensors_io.ShardedSafetensorsWriter.add
    calls = []

    def failing_add(self, name, tensor):
        calls.append(name)
        if len(calls) == 8:
            raise OSError("disk full")
        original(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardedSafetensorsWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        bridge.save_hf_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_with_dtype_shards_by_size(hf_checkpoints, tmp_path, runtime):
    bridge = AutoBridge.from_hf_pretrained(hf_checkpoints["llama"])
    model = bridge.to_megatron_model(load_weights=True)
    bridge.save_hf_pretrained(model, tmp_path / "out", dtype="bfloat16", max_shard_size="100KB")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    source = AutoModelForCausalLM.from_pretrained(hf_checkpoints["llama"])
    for (name, a), (_, b) in zip(source.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert len(list((tmp_path / "out").glob("*.safetensors"))) >= 2


@pytest.mark.parametrize("threads,offline,message", [
    (4, False, "threads sets the offline converter's readers / writers; the model-building path"),
    (0, True, "threads must be a positive integer, got 0"),
])
def test_threads_is_refused_where_nothing_reads_it(threads, offline, message, hf_checkpoints, tmp_path):
    with pytest.raises(ValueError, match=message):
        AutoBridge.import_ckpt(hf_checkpoints["llama"], tmp_path / "mc", offline=offline, threads=threads)
    with pytest.raises(ValueError, match=message):
        AutoBridge.export_ckpt(tmp_path / "mc", tmp_path / "hf", offline=offline, threads=threads)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size,message", [(0, "at least one byte, got 0"), ("0KB", "at least one byte"),
                                          (True, "cannot parse a size from True"), ("lots", "cannot parse")])
def test_a_bad_max_shard_size_is_refused_before_anything_is_written(size, message, hf_checkpoints, tmp_path,
                                                                    runtime):
    bridge = AutoBridge.from_hf_pretrained(hf_checkpoints["llama"])
    model = bridge.to_megatron_model(load_weights=True)
    with pytest.raises(ValueError, match=message):  # (0 wrote one file per tensor; text failed once gathering)
        bridge.save_hf_pretrained(model, tmp_path / "out", max_shard_size=size)
    AutoBridge.import_ckpt(hf_checkpoints["llama"], tmp_path / "mc")
    for offline in (True, False):
        with pytest.raises(ValueError, match=message):
            AutoBridge.export_ckpt(tmp_path / "mc", tmp_path / "hf", max_shard_size=size, offline=offline)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mc"]
