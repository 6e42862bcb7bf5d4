"""The PEFT base: matching, freezing, counts, adapter state, disabling, options, a user-defined method."""

from dataclasses import dataclass, field

import pytest
import torch
from peft_helpers import randomize_adapters

from bridge_convert import AutoBridge
from bridge_convert.forward import forward_logits
from bridge_peft import PEFT, AdapterModule, CanonicalLoRA, DoRA, LoRA, adapters_disabled
from bridge_peft.linear import linear_info
from bridge_peft.matching import matches

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ckpt(hf_checkpoints):
    return hf_checkpoints["llama31"]


def _model(ckpt, **overrides):
    return AutoBridge.from_hf_pretrained(ckpt).to_megatron_model(load_weights=True, **overrides)


def _adapted(model) -> list[str]:
    return sorted(n for n, m in model[0].named_modules() if hasattr(m, "adapter") and isinstance(
        m.adapter, AdapterModule))


@pytest.mark.parametrize(("name", "pattern", "expected"), [
    ("decoder.layers.0.self_attention.linear_qkv", "linear_qkv", True),
    ("decoder.layers.0.self_attention.linear_qkv", "qkv", False),
    ("decoder.layers.0.self_attention.linear_qkv", "*.layers.0.*.linear_qkv", True),
    ("decoder.layers.10.self_attention.linear_qkv", "*.layers.1.*.linear_qkv", False),
    ("decoder.layers.3.mlp.linear_fc1", r"re:decoder\.layers\.[0-3]\.mlp\..*", True),
    ("decoder.layers.4.mlp.linear_fc1", r"re:decoder\.layers\.[0-3]\.mlp\..*", False),
    ("decoder.layers.3.mlp.linear_fc2", "decoder.layers.3.mlp.linear_fc2", True),
])
def test_patterns(name, pattern, expected):
    assert matches(name, [pattern]) is expected


def test_targets_excludes_freeze_and_counts(ckpt, runtime):
    model = _model(ckpt)
    lora = LoRA(target_modules=["linear_qkv", "re:.*linear_fc[12]"], exclude_modules=["*.layers.1.mlp.linear_fc2"],
                dim=4, alpha=8)
    assert lora(model, training=True) is model
    assert _adapted(model) == ["decoder.layers.0.mlp.linear_fc1", "decoder.layers.0.mlp.linear_fc2",
                               "decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc1",
                               "decoder.layers.1.self_attention.linear_qkv"]
    expected = sum(4 * sum(m.weight.shape) for n, m in model[0].named_modules() if n in _adapted(model))
    counts = lora.parameter_counts(model)
    assert counts["trainable"] == expected
    assert counts["total"] == expected + sum(p.numel() for p in _model(ckpt)[0].parameters())
    assert {id(p) for p in lora.trainable_parameters(model)} == {
        id(p) for n, p in model[0].named_parameters() if ".adapter." in n}
    assert all(not p.requires_grad for n, p in model[0].named_parameters() if ".adapter." not in n)


def _linear_names(model) -> list[str]:
    from bridge_peft.matching import linear_layer_names

    return linear_layer_names(model[0].config)


def test_bad_settings_fail_with_one_clear_error_and_leave_the_model(ckpt, runtime):
    for kwargs, message in [({"dim": 0}, "dim must be a positive integer"), ({"dim": -2}, "dim must be"),
                            ({"alpha": 0}, "alpha must be a finite number > 0"), ({"dropout": 1.5}, "dropout must be a number in"),
                            ({"dropout_position": "mid"}, "dropout_position"),
                            ({"dropout_position": "post"}, r"dropout_position='post' places a dropout, but "
                                                           r"LoRA.dropout is 0"),  # (nothing read it)
                            ({"lora_A_init_method": "ones"}, "lora_A_init_method"),
                            ({"target_modules": []}, "target_modules is empty"),
                            ({"target_modules": ["re:("]}, "not a valid regular expression"),
                            # accepted before (alpha nan made every logit nan), or raw float() errors
                            ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
                            ({"alpha": float("inf")}, "alpha must be a finite number"),
                            ({"alpha": True}, "alpha must be a finite number"),
                            ({"dropout": "x"}, "dropout must be a number in"),
                            ({"dropout": None}, "dropout must be a number in"),
                            ({"split_a_on_rank": "no"}, "split_a_on_rank must be true or false"),
                            ({"seed": "abc"}, "seed must be an integer")]:
        with pytest.raises(ValueError, match=message):
            LoRA(**kwargs)
    model = _model(ckpt)
    with pytest.raises(ValueError, match=r"\['linear_qvk'\] match no linear layer") as info:
        LoRA(target_modules=["linear_qkv", "linear_qvk"])(model)
    assert "HF names" not in str(info.value)
    with pytest.raises(ValueError, match=r"\['q_proj', 'down_proj'\] are HF names: megatron's are \{'q_proj': "
                                         r"'linear_qkv / linear_q', 'down_proj': 'linear_fc2'\}"):
        LoRA(target_modules=["q_proj", "down_proj"])(model)  # what an HF peft user types first
    assert _adapted(model) == [] and all(p.requires_grad for p in model[0].parameters())
    lora = LoRA(dim=4)
    lora.dim = 0  # a dotted override after construction is checked when the method is applied
    with pytest.raises(ValueError, match="dim must be"):
        lora(model)
    with pytest.raises(ValueError, match=r"LoRA: exclude_modules \['\*\.linear_qkv'\] removes every layer "
                                         r"target_modules \['linear_qkv'\] matches: nothing would be adapted"):
        LoRA(target_modules=["linear_qkv"], exclude_modules=["*.linear_qkv"])(model)  # applied 0 adapters
    with pytest.raises(ValueError, match=r"LoRA.exclude_modules \['\*\.layers\.9\.\*'\] match no linear layer"):
        LoRA(exclude_modules=["*.layers.1.*", "*.layers.9.*"])(model)  # a layer the model lacks excluded nothing
    with pytest.raises(ValueError, match=r"LoRA.exclude_modules \['linear_q'\] match no linear layer"):
        LoRA(exclude_modules=["linear_q"]).check_target_names(_linear_names(model))  # by name, no model
    with pytest.raises(ValueError, match=r"\['linear_qkv'\] are fused layers, which CanonicalLoRA targets by their "
                                         r"parts: linear_qkv -> linear_q / linear_k / linear_v"):
        CanonicalLoRA(target_modules=["linear_qkv"])(model)
    LoRA(dim=2)(model)
    with pytest.raises(ValueError, match="already has an adapter"):
        LoRA(dim=2)(model)


def test_adapters_of_16_bit_on_float32_weights_are_refused_by_the_training_check(ckpt, runtime):
    """megatron-core's optimizer without mixed precision asserted float32 grads at the first step of the run."""
    model = _model(ckpt)
    with pytest.raises(ValueError, match=r"LoRA\.lora_dtype='bfloat16' on float32 weights: without mixed precision"):
        LoRA(lora_dtype="bfloat16").check_targets(model)
    LoRA(lora_dtype="float32").check_targets(model)
    LoRA(lora_dtype="bfloat16").check_targets(_model(ckpt, params_dtype=torch.bfloat16, bf16=True))


def test_zero_b_starts_at_the_base_and_disabling_restores_it(ckpt, runtime):
    model = _model(ckpt)
    base = forward_logits(model, IDS)
    DoRA(dim=4, alpha=8, lora_A_init_method="kaiming")(model)
    assert torch.equal(forward_logits(model, IDS), base) or \
        (forward_logits(model, IDS) - base).abs().max() < 1e-5  # B = 0, m = ||W||: the identity
    randomize_adapters(model, seed=2)
    adapted = forward_logits(model, IDS)
    assert (adapted - base).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(forward_logits(model, IDS), base)
    assert torch.equal(forward_logits(model, IDS), adapted)


def test_adapter_state_dict_round_trip(ckpt, runtime):
    model = _model(ckpt)
    peft = CanonicalLoRA(dim=3, alpha=3)
    peft(model)
    randomize_adapters(model, seed=9)
    state = peft.adapter_state_dict(model)
    assert state and all(".adapter." in k for k in state)
    assert "decoder.layers.1.self_attention.linear_qkv.adapter.branches.k.lora_b" in state
    fresh = _model(ckpt)
    peft(fresh)
    peft.load_adapter_state_dict(fresh, state)
    assert torch.equal(forward_logits(fresh, IDS), forward_logits(model, IDS))
    with pytest.raises(ValueError, match="missing"):
        peft.load_adapter_state_dict(fresh, {k: v for k, v in state.items() if "layers.0" not in k})
    # merged: the unmerge after a load subtracted the new values' delta from weights holding the old one
    base = {k: v.clone() for k, v in fresh[0].state_dict().items() if k.endswith(".weight") and "adapter" not in k}
    PEFT.merge(fresh)
    with pytest.raises(ValueError, match=r"the adapters are merged into the weights .*: unmerge them"):
        peft.load_adapter_state_dict(fresh, {k: torch.randn_like(v) for k, v in state.items()})
    PEFT.unmerge(fresh)
    after = fresh[0].state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in base.items()) < 1e-5


def test_init_dtype_and_dropout_options(ckpt, runtime):
    model = _model(ckpt)
    LoRA(dim=4, alpha=4, lora_A_init_method="kaiming", lora_B_init_method="xavier", lora_dtype="bfloat16",
         dropout=0.5, dropout_position="post", target_modules=["linear_fc2"])(model)
    fc2 = model[0].decoder.layers[0].mlp.linear_fc2
    branch = fc2.adapter.branches["all"]
    assert branch.lora_a.dtype == torch.bfloat16 and branch.lora_b.abs().sum() > 0
    assert branch.lora_a.abs().max() <= 1 / fc2.weight.shape[1] ** 0.5 + 1e-3  # kaiming-uniform bound
    x = torch.randn(5, 1, fc2.weight.shape[1])
    fc2.train()
    a, b = fc2(x)[0], fc2(x)[0]
    assert a.dtype == torch.float32 and not torch.equal(a, b)  # dropout on the adapter output in training
    fc2.eval()
    assert torch.equal(fc2(x)[0], fc2(x)[0])


# ------------------------------------------------------------------------------ a user-defined PEFT
class ChannelScale(AdapterModule):
    """IA3-style: a learned scale per output channel of a row-parallel layer (its output is not TP-split)."""

    def __init__(self, info):
        super().__init__(info)
        self.scale = torch.nn.Parameter(torch.ones(info.out_features))

    def forward(self, x, out, *, weight, base_bias=None):
        return out * self.scale.to(out.dtype)


@dataclass(kw_only=True)
class IA3(PEFT):
    target_modules: list[str] = field(default_factory=lambda: ["linear_proj", "linear_fc2"])

    def make_adapter(self, module, name, projections):
        info = linear_info(module, name)
        if info.parallel != "row":
            raise ValueError(f"IA3 here scales row-parallel layers only; {name} is {info.parallel}-parallel")
        return ChannelScale(info)


def test_user_defined_peft_trains(ckpt, runtime):
    model = _model(ckpt)
    base = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    peft = IA3()
    peft(model, training=True)
    params = peft.trainable_parameters(model)
    assert len(params) == 4 and all(p.shape == (64,) for p in params)
    opt = torch.optim.Adam(params, lr=0.05)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(16).expand(4, 16)
    losses = []
    model[0].train()
    for _ in range(15):
        loss = model[0](ids[:, :-1], positions[:, :-1], None, labels=ids[:, 1:]).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, base[n]) for n, p in model[0].named_parameters() if n in base)
    assert set(peft.adapter_state_dict(model)) == {f"decoder.layers.{i}.{m}.adapter.scale" for i in (0, 1)
                                                  for m in ("self_attention.linear_proj", "mlp.linear_fc2")}


def test_an_adapter_that_cannot_be_made_leaves_the_model_untouched(ckpt, hf_checkpoints, runtime):
    """make_adapter refusing a later layer must not leave the earlier ones adapted (or the base frozen)."""
    model = _model(ckpt)
    with pytest.raises(ValueError, match="decoder.layers.1.self_attention.linear_qkv is column-parallel"):
        IA3(target_modules=["linear_proj", "*.layers.1.*.linear_qkv"])(model)  # layer 0's linear_proj comes first
    assert _adapted(model) == [] and all(p.requires_grad for p in model[0].parameters())
    # a tied output layer (Llama 3.2) has no weight of its own to adapt or merge into, at any pipeline layout
    tied = _model(hf_checkpoints["llama32"])
    with pytest.raises(ValueError, match="output_layer shares its weight with the embedding"):
        LoRA(target_modules=["linear_proj", "output_layer"])(tied)
    assert _adapted(tied) == [] and all(p.requires_grad for p in tied[0].parameters())
    LoRA(target_modules=["linear_proj", "output_layer"], exclude_modules=["output_layer"])(tied)
    untied = _model(ckpt)
    LoRA(target_modules=["output_layer"])(untied)
    assert _adapted(untied) == ["output_layer"]


@pytest.mark.parametrize("method", [DoRA, CanonicalLoRA], ids=["dora", "canonical_dora"])
def test_dora_on_a_padded_output_layer_trains_finite(method, runtime, tmp_path):
    """megatron pads the vocabulary (100 -> 128 rows here): those rows of W + s BA are zero, and DoRA's m / ||.||
    was 0 / 0 there, so the training loss (a softmax over the padded vocabulary) was NaN from the first step."""
    from bridge_convert.testing import save_tiny_hf_checkpoint

    model = _model(save_tiny_hf_checkpoint(tmp_path / "hf", "llama31", vocab_size=100))
    assert model[0].output_layer.weight.shape[0] == 128
    extra = {"use_dora": True} if method is CanonicalLoRA else {}
    method(target_modules=["output_layer", "linear_proj"], dim=4, alpha=8, **extra)(model)  # B = 0: a real start
    ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(4))
    model[0].train()
    loss = model[0](ids[:, :-1], torch.arange(12).expand(2, 12), None, labels=ids[:, 1:]).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model[0].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # a row whose magnitude is 0 merges to 0; unmerging must give the base row back, not 0 / 0
    from bridge_peft import merge_adapters, unmerge_adapters

    randomize_adapters(model, seed=2)
    with torch.no_grad():
        for branch in model[0].output_layer.adapter.branches.values():
            branch.magnitude[:3] = 0
    base = model[0].output_layer.weight.detach().clone()
    merge_adapters(model)
    assert torch.equal(model[0].output_layer.weight[:3], torch.zeros_like(base[:3]))
    unmerge_adapters(model)
    torch.testing.assert_close(model[0].output_layer.weight.detach(), base, atol=1e-6, rtol=0)


def test_a_drawn_b_on_output_layer_does_not_depend_on_the_vocab_padding(runtime, tmp_path):
    """B of ``output_layer`` is drawn over the real vocabulary (100 rows): megatron's padding (128 rows at TP=1,
    256 at TP=2 with the default divisor) starts at zero, so the same seed gives the same adapter at every TP."""
    from bridge_convert.testing import save_tiny_hf_checkpoint

    hf = save_tiny_hf_checkpoint(tmp_path / "hf", "llama31", vocab_size=100)
    b = {}
    for divisor in (128, 256):
        model = _model(hf, make_vocab_size_divisible_by=divisor)
        LoRA(target_modules=["output_layer"], dim=4, alpha=8, lora_B_init_method="xavier")(model)
        b[divisor] = model[0].output_layer.adapter.branches["all"].lora_b.detach()
        assert b[divisor].shape[0] == divisor and torch.count_nonzero(b[divisor][100:]) == 0
    assert torch.count_nonzero(b[128][:100]) == 400
    assert torch.equal(b[128][:100], b[256][:100])
    # xavier's fan_out is the real vocabulary, as HF peft's lm_head adapter of 100 rows has it
    assert abs(float(b[128][:100].std()) - (2.0 / (100 + 4)) ** 0.5) < 0.03


def test_native_and_local_specs_give_the_same_adapter_gradients(ckpt, runtime):
    """The native spec (fused chunked loss, which skips the frozen output layer's weight-gradient GEMM) and the
    local spec agree on every adapter gradient, an lm_head adapter's included; no frozen base weight gets a
    gradient."""
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(12).expand(2, 12)
    grads = []
    for impl in ("native", "local"):
        model = _model(ckpt, transformer_impl=impl)
        LoRA(dim=4, alpha=8, lora_B_init_method="xavier",
             target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"])(model)
        model[0].train()
        model[0](ids[:, :-1], positions, None, labels=ids[:, 1:]).float().mean().backward()
        assert all(p.grad is None for n, p in model[0].named_parameters() if ".adapter." not in n)
        grads.append({n: p.grad for n, p in model[0].named_parameters() if ".adapter." in n})
    # 16 in the layers and the lm_head's pair (the native loss runs the adapted output layer's forward)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 18
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["llama31", "llama32", "qwen3", "mistral"])
def test_linear_layer_names_without_a_model_are_the_built_models(family, hf_checkpoints, runtime):
    from bridge_peft.base import _is_parallel_linear, global_module_names
    from bridge_peft.matching import linear_layer_names

    bridge = AutoBridge.from_hf_pretrained(hf_checkpoints[family])
    for impl in ("native", "local"):
        model = bridge.to_megatron_model(load_weights=False, transformer_impl=impl)
        built = sorted(name for name, _, module in global_module_names(model[0]) if _is_parallel_linear(module))
        assert sorted(linear_layer_names(bridge.to_megatron_provider())) == built, impl


def test_target_names_are_checked_by_name_as_applying_checks_them(ckpt, runtime):
    from bridge_peft.matching import linear_layer_names

    names = linear_layer_names(AutoBridge.from_hf_pretrained(ckpt).to_megatron_provider())
    good = [LoRA(target_modules=["linear_qkv", "*.layers.1.mlp.linear_fc2"]),
            CanonicalLoRA(target_modules=["linear_q", "re:.*layers\\.0.*linear_fc1_up"])]
    for method in good:
        method.check_target_names(names)
    bad = [LoRA(target_modules=["linear_qkv", "q_proj"]), DoRA(target_modules=["*.layers.7.*"]),
           CanonicalLoRA(target_modules=["linear_qkv"])]
    for method in bad:
        with pytest.raises(ValueError) as by_name:
            method.check_target_names(names)
        with pytest.raises(ValueError) as applied:
            method(_model(ckpt))
        assert str(by_name.value) == str(applied.value)
