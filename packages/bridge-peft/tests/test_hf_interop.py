"""HF interop against HF ``peft`` as the oracle: exported adapters, imported peft adapters, merged exports."""

import json

import pytest
import torch
from peft_helpers import ORACLE_FAMILIES, randomize_adapters

from bridge_convert import AutoBridge
from bridge_convert.forward import forward_logits
from bridge_peft import (
    CanonicalLoRA,
    DoRA,
    LoRA,
    load_hf_adapter,
    merge_adapters,
    save_hf_adapter,
    unmerge_adapters,
)

METHODS = {
    "lora": lambda: LoRA(dim=4, alpha=8),
    "dora": lambda: DoRA(dim=4, alpha=8),
    "canonical": lambda: CanonicalLoRA(dim=4, alpha=8),
}
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))


def _megatron(ckpt, **overrides):
    bridge = AutoBridge.from_hf_pretrained(ckpt)
    return bridge, bridge.to_megatron_model(load_weights=True, **overrides)


def _hf(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@torch.no_grad()
def _peft_logits(ckpt, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(_hf(ckpt), str(adapter_dir)).eval()(IDS).logits


@pytest.fixture(scope="module")
def base_logits(hf_checkpoints):
    with torch.no_grad():
        return {f: _hf(hf_checkpoints[f])(IDS).logits for f in ORACLE_FAMILIES}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ORACLE_FAMILIES)
def test_exported_adapter_gives_peft_the_same_logits(family, method, hf_checkpoints, base_logits, runtime,
                                                     tmp_path):
    bridge, model = _megatron(hf_checkpoints[family])
    METHODS[method]()(model, training=True)
    randomize_adapters(model, seed=hash((family, method)) % 1000)
    ours = forward_logits(model, IDS)
    save_hf_adapter(bridge, model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is (method == "dora") and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    theirs = _peft_logits(hf_checkpoints[family], tmp_path / "adapter")
    assert (theirs - base_logits[family]).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_local_spec_and_partial_targets_export(hf_checkpoints, runtime, tmp_path):
    """The local spec, a wildcard target on one layer and an exclusion: peft gets exactly those modules."""
    bridge, model = _megatron(hf_checkpoints["llama31"], transformer_impl="local")
    LoRA(target_modules=["*.layers.1.*.linear_qkv", "linear_fc2"], exclude_modules=["*.layers.0.*"], dim=3,
         alpha=5)(model)
    randomize_adapters(model, seed=3)
    ours = forward_logits(model, IDS)
    save_hf_adapter(bridge, model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # a regex: not every layer is adapted
    torch.testing.assert_close(ours, _peft_logits(hf_checkpoints["llama31"], tmp_path / "adapter"), atol=1e-4,
                               rtol=0)


def _peft_made_adapter(ckpt, out, *, use_dora, targets, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_hf(ckpt), LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_dora=use_dora,
                                                 init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    model.save_pretrained(str(out))
    with torch.no_grad():
        return model.eval()(IDS).logits


ALL_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(("family", "use_dora", "targets"), [
    ("llama31", False, ALL_HF), ("qwen3", True, ALL_HF), ("mistral", False, ["q_proj", "v_proj"]),
    ("llama32", True, ["k_proj", "down_proj", "up_proj"]),
])
def test_peft_made_adapter_imports_with_peft_logits(family, use_dora, targets, hf_checkpoints, runtime, tmp_path):
    theirs = _peft_made_adapter(hf_checkpoints[family], tmp_path / "adapter", use_dora=use_dora, targets=targets)
    bridge, model = _megatron(hf_checkpoints[family])
    load_hf_adapter(bridge, model, tmp_path / "adapter")
    torch.testing.assert_close(forward_logits(model, IDS), theirs, atol=1e-4, rtol=0)
    # per-projection A's differ in a peft-made adapter: canonical branches
    qkv = model[0].decoder.layers[0].self_attention.linear_qkv
    assert not hasattr(qkv, "adapter") or "all" not in qkv.adapter.branches


def test_an_adapter_loaded_for_inference_runs_without_its_dropout(hf_checkpoints, runtime, tmp_path):
    """peft's from_pretrained (is_trainable=False) puts the model in eval mode; so does load_hf_adapter(training=False):
    a direct forward (not forward_logits, which switches to eval itself) gives peft's logits, every time."""
    from peft import LoraConfig, get_peft_model

    ckpt = hf_checkpoints["llama32"]
    model = get_peft_model(_hf(ckpt), LoraConfig(r=4, lora_alpha=6, target_modules=ALL_HF, lora_dropout=0.5,
                                                 init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "adapter"))
    theirs = _peft_logits(ckpt, tmp_path / "adapter")
    bridge, chunks = _megatron(ckpt)
    load_hf_adapter(bridge, chunks, tmp_path / "adapter")
    positions = torch.arange(IDS.shape[1]).expand_as(IDS)
    with torch.no_grad():
        for _ in range(2):
            ours = chunks[0](IDS, positions, attention_mask=None)[..., :theirs.shape[-1]]
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert not any(module.training for module in chunks[0].modules())
    trained = _megatron(ckpt)[1]
    load_hf_adapter(bridge, [chunk.eval() for chunk in trained], tmp_path / "adapter", training=True)
    assert all(module.training for module in trained[0].modules())  # the caller trains it: train mode


def test_peft_made_lm_head_adapter_loads_and_its_saved_base_is_checked(hf_checkpoints, runtime, tmp_path):
    """peft saves an adapted lm_head's own weight with the adapter (save_embedding_layers): it is the base's here,
    so the adapter loads with peft's logits; an adapter whose saved weight differs is refused with nothing attached."""
    from safetensors.torch import load_file, save_file

    theirs = _peft_made_adapter(hf_checkpoints["llama31"], tmp_path / "a", use_dora=True, targets=["q_proj", "lm_head"])
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in saved
    bridge, model = _megatron(hf_checkpoints["llama31"])
    load_hf_adapter(bridge, model, tmp_path / "a")
    assert hasattr(model[0].output_layer, "adapter")
    torch.testing.assert_close(forward_logits(model, IDS), theirs, atol=1e-4, rtol=0)

    saved["base_model.model.lm_head.base_layer.weight"] = saved["base_model.model.lm_head.base_layer.weight"] * 1.01
    save_file(saved, tmp_path / "a" / "adapter_model.safetensors")
    bridge, model = _megatron(hf_checkpoints["llama31"])
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight: .* differs from this model's"):
        load_hf_adapter(bridge, model, tmp_path / "a")
    assert not any(hasattr(m, "adapter") for m in model[0].modules())


def test_fused_adapter_round_trips_through_hf_bytes_identical(hf_checkpoints, runtime, tmp_path):
    bridge, model = _megatron(hf_checkpoints["qwen3"])
    DoRA(dim=4, alpha=8)(model)
    randomize_adapters(model, seed=11)
    ours = forward_logits(model, IDS)
    save_hf_adapter(bridge, model, tmp_path / "a")
    bridge2, fresh = _megatron(hf_checkpoints["qwen3"])
    load_hf_adapter(bridge2, fresh, tmp_path / "a")
    assert "all" in fresh[0].decoder.layers[0].self_attention.linear_qkv.adapter.branches  # one shared A: fused
    torch.testing.assert_close(forward_logits(fresh, IDS), ours, atol=1e-6, rtol=0)
    save_hf_adapter(bridge2, fresh, tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_unmerge_and_merged_export(method, hf_checkpoints, runtime, tmp_path):
    from transformers import AutoModelForCausalLM

    bridge, model = _megatron(hf_checkpoints["llama32"])
    base = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    METHODS[method]()(model)
    randomize_adapters(model, seed=5)
    with_adapters = forward_logits(model, IDS)
    merge_adapters(model)
    torch.testing.assert_close(forward_logits(model, IDS), with_adapters, atol=1e-4, rtol=0)
    bridge.save_hf_pretrained(model, tmp_path / "merged")
    merged_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged_hf(IDS).logits, with_adapters, atol=1e-4, rtol=0)
    unmerge_adapters(model)
    for name, param in model[0].named_parameters():
        if name in base:
            assert (param.detach() - base[name]).abs().max() <= 1e-6, name
    torch.testing.assert_close(forward_logits(model, IDS), with_adapters, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_disabling_a_merged_model_runs_the_base_and_merges_again(method, hf_checkpoints, runtime):
    from bridge_peft import adapters_disabled

    _, model = _megatron(hf_checkpoints["qwen3"])
    base = forward_logits(model, IDS)
    METHODS[method]()(model)
    randomize_adapters(model, seed=9)
    adapted = forward_logits(model, IDS)
    assert (adapted - base).abs().max() > 1e-2
    merge_adapters(model)
    with adapters_disabled(model):
        torch.testing.assert_close(forward_logits(model, IDS), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(forward_logits(model, IDS), adapted, atol=1e-4, rtol=0)
    unmerge_adapters(model)  # still merged on exit: unmerging gives the adapted model through the adapters
    torch.testing.assert_close(forward_logits(model, IDS), adapted, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_bf16_merge_rounds_once(method, hf_checkpoints, runtime):
    """bf16 base and bf16 adapters: the merged weight is the exact (float64) merge rounded once to bf16; a bf16
    product s B A rounded a quarter of the elements one more time."""
    from bridge_peft.base import adapters_of

    _, model = _megatron(hf_checkpoints["llama32"], params_dtype=torch.bfloat16)
    METHODS[method]()(model)
    randomize_adapters(model, seed=3)
    pairs = adapters_of(model)
    expected = []
    for linear, adapter in pairs:
        [branch] = adapter.branches.values()  # fused: one branch for the whole layer
        w = linear.weight.detach().double()
        full = w + adapter.scale * branch.lora_b.double() @ branch.lora_a.double()
        if adapter.dora:
            full = branch.magnitude.double()[:, None] / full.norm(dim=1, keepdim=True) * full
        expected.append(full.to(torch.bfloat16))
    merge_adapters(model)
    differing = total = 0
    for (linear, _), want in zip(pairs, expected):
        got = linear.weight.detach()
        off = got != want
        ulp = (want.float().abs() * 2.0 ** -7).clamp_min(2.0 ** -133)  # bf16: 8 significant bits
        assert ((got.float() - want.float()).abs()[off] <= ulp[off]).all()  # at most one rounding step away
        differing, total = differing + int(off.sum()), total + off.numel()
    assert differing / total < 1e-3, (differing, total)


# ------------------------------------------------------------------------------------------ bad input
def test_missing_adapter_files_are_named(hf_checkpoints, runtime, tmp_path):
    bridge, model = _megatron(hf_checkpoints["llama31"])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hf_adapter(bridge, model, tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        load_hf_adapter(bridge, model, tmp_path / "a")
    assert not any(hasattr(m, "adapter") for m in model[0].modules())


def test_a_named_peft_adapter_in_a_subdirectory_is_pointed_to(hf_checkpoints, runtime, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_hf(hf_checkpoints["llama31"]), LoraConfig(r=2, target_modules=["q_proj"]),
                           adapter_name="math")
    model.save_pretrained(str(tmp_path / "out"))  # peft writes a non-default adapter to out/math/
    bridge, ours = _megatron(hf_checkpoints["llama31"])
    with pytest.raises(FileNotFoundError, match=r"adapters \['math'\] in subdirectories.*out/math"):
        load_hf_adapter(bridge, ours, tmp_path / "out")
    load_hf_adapter(bridge, ours, tmp_path / "out" / "math")


def test_adapter_for_another_base_is_refused_with_shapes(hf_checkpoints, runtime, tmp_path):
    _peft_made_adapter(hf_checkpoints["qwen3"], tmp_path / "qwen", use_dora=False, targets=["q_proj"])
    bridge, model = _megatron(hf_checkpoints["llama31"])
    with pytest.raises(ValueError, match=r"q_proj.lora_b: shape \(128, 4\), this model needs \(64, 4\)"):
        load_hf_adapter(bridge, model, tmp_path / "qwen")
    assert not any(hasattr(m, "adapter") for m in model[0].modules())


def test_bad_ranks_and_alphas_in_the_adapter_config_are_named(hf_checkpoints, runtime, tmp_path):
    """lora_alpha null was a raw float() TypeError; an r other than the tensors' rank blamed the base model."""
    _peft_made_adapter(hf_checkpoints["llama31"], tmp_path / "a", use_dora=False, targets=["q_proj"])
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    bridge, model = _megatron(hf_checkpoints["llama31"])
    for change, message in [({"lora_alpha": None}, r"lora_alpha must be a positive number, got None"),
                            ({"r": "4"}, r"r must be a positive integer \(the LoRA rank\), got '4'"),
                            ({"r": config["r"] * 2}, rf"q_proj: its lora_A / lora_B have rank \[{config['r']}\], but "
                                                     rf"adapter_config.json says r={config['r'] * 2}")]:
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load_hf_adapter(bridge, model, tmp_path / "a")
    assert not any(hasattr(m, "adapter") for m in model[0].modules())


def test_unrepresentable_adapters_are_named(hf_checkpoints, runtime, tmp_path):
    _peft_made_adapter(hf_checkpoints["llama32"], tmp_path / "embed", use_dora=False, targets=["embed_tokens"])
    bridge, model = _megatron(hf_checkpoints["llama32"])
    with pytest.raises(ValueError, match="embed_tokens"):
        load_hf_adapter(bridge, model, tmp_path / "embed")
    config = json.loads((tmp_path / "embed" / "adapter_config.json").read_text())
    (tmp_path / "embed" / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(ValueError, match="bias='all'"):
        load_hf_adapter(bridge, model, tmp_path / "embed")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapters_whose_init_rewrites_the_base_are_refused_and_peft_converted_ones_load(init, hf_checkpoints, runtime,
                                                                                       tmp_path):
    """peft recomputes a PiSSA / OLoRA adapter's initial A, B on load and subtracts them from the base: the saved
    A, B alone give other logits (they loaded silently before). Converted to plain LoRA by peft, it loads."""
    from peft import LoraConfig, get_peft_model

    ckpt = hf_checkpoints["llama31"]
    torch.manual_seed(0)
    trained = get_peft_model(_hf(ckpt), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                   init_lora_weights=init))
    trained.peft_config["default"].init_lora_weights = True  # the initial adapter, as peft's docs save it
    trained.save_pretrained(str(tmp_path / "initial"))
    trained.peft_config["default"].init_lora_weights = init
    with torch.no_grad():  # "training"
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    trained.save_pretrained(str(tmp_path / "raw"))
    bridge, model = _megatron(ckpt)
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        load_hf_adapter(bridge, model, tmp_path / "raw")
    assert not any(hasattr(m, "adapter") for m in model[0].modules())

    trained.save_pretrained(str(tmp_path / "converted"),
                            path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with torch.no_grad():
        theirs = trained.eval()(IDS).logits
    load_hf_adapter(bridge, model, tmp_path / "converted")
    torch.testing.assert_close(forward_logits(model, IDS), theirs, atol=1e-4, rtol=0)
    assert (theirs - _hf(ckpt)(IDS).logits).abs().max() > 1e-2


def test_adapter_config_without_r_or_alpha_takes_peft_defaults_and_a_corrupt_file_is_named(hf_checkpoints, runtime,
                                                                                           tmp_path):
    """peft reads a config that leaves out lora_alpha (and r) with LoraConfig's defaults; so does the import (a
    bare KeyError before). A truncated safetensors file is an error naming it (safetensors' own error did not)."""
    ckpt = hf_checkpoints["llama31"]
    _peft_made_adapter(ckpt, tmp_path / "a", use_dora=False, targets=["q_proj", "down_proj"])
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["lora_alpha"] != 8
    del config["lora_alpha"]
    config_path.write_text(json.dumps(config))
    theirs = _peft_logits(ckpt, tmp_path / "a")
    bridge, model = _megatron(ckpt)
    load_hf_adapter(bridge, model, tmp_path / "a")
    torch.testing.assert_close(forward_logits(model, IDS), theirs, atol=1e-4, rtol=0)

    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    bridge, model = _megatron(ckpt)
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
        load_hf_adapter(bridge, model, tmp_path / "a")


def test_save_refuses_a_non_empty_output_and_leaves_it(hf_checkpoints, runtime, tmp_path):
    bridge, model = _megatron(hf_checkpoints["llama31"])
    LoRA(dim=2, alpha=2)(model)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="out"):
        save_hf_adapter(bridge, model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
