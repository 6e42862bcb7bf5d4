"""The Megatron checkpoint format: import at one layout, export at another, bit-exactly."""

import json
from pathlib import Path

import pytest

from bridge_convert import AutoBridge
from bridge_convert.megatron_ckpt import (
    METADATA_FILE,
    TRACKER_FILE,
    read_checkpoint_metadata,
    resolve_checkpoint_dir,
)
from bridge_convert.runtime import initialize_parallel
from bridge_convert.testing import assert_same_checkpoint, run_multiprocess


def _import_body(hf_path: str, megatron_path: str, tp: int, pp: int) -> None:
    initialize_parallel()
    AutoBridge.import_ckpt(hf_path, megatron_path, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


@pytest.mark.multiproc
def test_import_at_tp2_export_at_tp1_is_bit_exact(hf_checkpoints, tmp_path, runtime):
    run_multiprocess(_import_body, 2, hf_checkpoints["llama32"], str(tmp_path / "mcore"), 2, 1)
    meta = read_checkpoint_metadata(tmp_path / "mcore")
    assert meta["saved_layout"]["tensor_model_parallel_size"] == 2
    assert meta["architecture"] == "LlamaForCausalLM" and meta["iteration"] == 0
    AutoBridge.export_ckpt(tmp_path / "mcore", tmp_path / "hf")
    assert_same_checkpoint(hf_checkpoints["llama32"], tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True


def test_import_export_world_size_one_keeps_assets(hf_checkpoints, tmp_path, runtime):
    AutoBridge.import_ckpt(hf_checkpoints["qwen2"], tmp_path / "mcore")
    assert (tmp_path / "mcore" / TRACKER_FILE).read_text().strip() == "0"
    directory = resolve_checkpoint_dir(tmp_path / "mcore")
    assert directory.name == "iter_0000000" and (directory / "hf_assets" / "generation_config.json").exists()
    assert resolve_checkpoint_dir(directory) == directory
    AutoBridge.export_ckpt(tmp_path / "mcore", tmp_path / "hf")
    assert_same_checkpoint(hf_checkpoints["qwen2"], tmp_path / "hf")
    assert (tmp_path / "hf" / "generation_config.json").exists()


def test_resolve_reports_missing_and_incomplete_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Megatron checkpoint"):
        resolve_checkpoint_dir(tmp_path)
    (tmp_path / TRACKER_FILE).write_text("5\n")
    with pytest.raises(FileNotFoundError, match="points at iteration 5, but .*iter_0000005 is not a complete"):
        resolve_checkpoint_dir(tmp_path)
    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "iter_0000005" / METADATA_FILE).write_text("{}")
    for file in (tmp_path / TRACKER_FILE, tmp_path / "iter_0000005" / METADATA_FILE):  # a file of one: its folder
        with pytest.raises(FileNotFoundError, match=f"{file.name} is a file of a Megatron checkpoint; pass the "
                                                    f"directory that holds it, {file.parent}$"):
            resolve_checkpoint_dir(file)


def test_extra_states_the_checkpoint_lacks_keep_the_modules_own(hf_checkpoints, tmp_path, runtime):
    # Transformer Engine's norm and attention modules carry an ``_extra_state`` (FP8 metadata) that the other layer
    # specs and the offline importer never write; a TE model must still load such a checkpoint. Here the native
    # final norm is given one, as TE's has: the load keeps it and every weight matches the HF checkpoint.
    import torch
    from megatron.core.utils import unwrap_model

    AutoBridge.import_ckpt(hf_checkpoints["llama32"], tmp_path / "mcore")  # offline: no such object in it
    bridge = AutoBridge.from_hf_pretrained(hf_checkpoints["llama32"])
    model = bridge.to_megatron_model(load_weights=False, transformer_impl="native")
    norm = unwrap_model(model)[0].decoder.final_layernorm
    calls = []

    class WithExtraState(type(norm)):
        def get_extra_state(self):
            return "fresh"

        def set_extra_state(self, state):
            calls.append(state)

    norm.__class__ = WithExtraState
    assert "decoder.final_layernorm._extra_state" in unwrap_model(model)[0].sharded_state_dict()
    bridge.load_megatron_checkpoint(model, tmp_path / "mcore")
    assert calls == []  # nothing was loaded into it: the module keeps its own state
    from safetensors.torch import load_file

    hf = {}
    for shard in sorted(Path(hf_checkpoints["llama32"]).glob("*.safetensors")):
        hf.update(load_file(shard))
    exported = dict(bridge.export_hf_weights(model))
    assert exported.keys() == hf.keys()
    assert all(torch.equal(exported[n], hf[n].to(exported[n].dtype)) for n in hf)
    # a subset by megatron name: the fused qkv of one layer gives its three HF tensors, nothing else
    from bridge_convert.model_bridge import export_hf_weights
    from bridge_convert.runtime import get_parallel_state

    some = dict(export_hf_weights(bridge.model_bridge, bridge._provider_of(model), model, get_parallel_state(),
                                  only={"decoder.layers.1.self_attention.linear_qkv.weight"}))
    assert sorted(some) == [f"model.layers.1.self_attn.{p}_proj.weight" for p in "kqv"]
    assert all(torch.equal(some[n], exported[n]) for n in some)


@pytest.mark.parametrize(("change", "message"), [
    ({"vocab_size": 160}, r"it was saved with a vocabulary of 128 tokens, this model has 160 \(model\.vocab_size\)"),
    ({"vocab_size": 100}, r"it was saved with a vocabulary of 128 tokens, this model has 100"),
    ({"intermediate_size": 96}, r"decoder\.layers\.mlp\.linear_fc2\.weight: shape \(2, 64, 128\) in the "
                                r"checkpoint, \(2, 64, 96\) in this model")])
def test_a_checkpoint_of_other_shapes_is_refused_naming_the_tensor(change, message, tmp_path, runtime):
    """megatron-core lets the embedding and output layer load at another size (their padded vocabulary depends on
    TP): a checkpoint of another vocabulary loaded silently, rows cut off or left random. Other shape
    mismatches were refused without naming the tensor."""
    from bridge_convert import CheckpointMismatchError
    from bridge_convert.testing import save_tiny_hf_checkpoint

    saved = save_tiny_hf_checkpoint(tmp_path / "saved", "llama32", vocab_size=128, seed=1)
    other = save_tiny_hf_checkpoint(tmp_path / "other", "llama32", seed=2, **{"vocab_size": 128, **change})
    AutoBridge.import_ckpt(saved, tmp_path / "mcore")
    bridge = AutoBridge.from_hf_pretrained(other)
    model = bridge.to_megatron_model(load_weights=False)
    with pytest.raises(CheckpointMismatchError, match=r"cannot load checkpoint .* into this model: " + message):
        bridge.load_megatron_checkpoint(model, tmp_path / "mcore")


def test_a_checkpoint_without_a_tensor_the_model_needs_is_one_clear_error(tmp_path, runtime):
    """torch's CheckpointException is a BaseException, which escaped as a traceback; now the load says which tensor
    the checkpoint lacks, and for an adapter-only (PEFT) checkpoint what it is and what to use instead."""
    from bridge_convert import CheckpointMismatchError
    from bridge_convert.testing import save_tiny_hf_checkpoint

    llama = save_tiny_hf_checkpoint(tmp_path / "llama", "llama", seed=1)
    qwen3 = save_tiny_hf_checkpoint(tmp_path / "qwen3", "qwen3", seed=1, head_dim=16)  # llama's shapes + q/k norms
    AutoBridge.import_ckpt(llama, tmp_path / "mcore")
    bridge = AutoBridge.from_hf_pretrained(qwen3)
    model = bridge.to_megatron_model(load_weights=False)
    with pytest.raises(CheckpointMismatchError, match=r"into this model: it has no 'decoder\.layers\.self_attention\."
                                                      r"[qk]_layernorm\.weight'"):
        bridge.load_megatron_checkpoint(model, tmp_path / "mcore")
    meta_path = tmp_path / "mcore" / "iter_0000000" / "bridge.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "peft": {"class": "bridge_peft.lora.LoRA", "fields": {}}}))
    with pytest.raises(CheckpointMismatchError, match=r"is an adapter checkpoint \(bridge_peft\.lora\.LoRA\): it holds "
                                                      r"the adapters, not the model's weights"):
        bridge.load_megatron_checkpoint(model, tmp_path / "mcore")
    # the offline export of such a checkpoint (its config names a model whose tensors it lacks) says the same
    meta["hf_config"] = json.loads((Path(qwen3) / "config.json").read_text())
    meta["architecture"] = meta["hf_config"]["architectures"][0]
    meta_path.write_text(json.dumps({**meta, "peft": {"class": "bridge_peft.lora.LoRA", "fields": {}}}))
    with pytest.raises(ValueError, match=r"is an adapter checkpoint \(bridge_peft\.lora\.LoRA\)"):
        AutoBridge.export_ckpt(tmp_path / "mcore", tmp_path / "hf-out")
    assert not (tmp_path / "hf-out").exists()
