"""Every recipe builds and validates without building a model; its fields are the HF and published values."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_llama_spec import HF_VALUES

from bridge_recipes.llama import MODELS
from bridge_recipes.llama._builders import pipeline_layout_with_embedding_and_loss
from bridge_recipes.registry import RECIPES

# Megatron Bridge's published recipes: recipe -> (TP, PP, VP, CP, SP, seq, global batch)
PUBLISHED = {
    "llama32_1b_pretrain": (1, 1, None, 1, False, 8192, 512), "llama32_3b_pretrain": (1, 1, None, 1, False, 8192, 512),
    "llama3_8b_pretrain": (1, 1, None, 2, False, 8192, 512), "llama31_8b_pretrain": (1, 1, None, 2, False, 8192, 512),
    "llama3_70b_pretrain": (4, 4, 5, 2, True, 8192, 512), "llama31_70b_pretrain": (4, 4, 5, 2, True, 131072, 512),
    "llama31_405b_pretrain": (8, 8, 2, 4, True, 131072, 512),
    "llama32_1b_sft": (1, 1, None, 1, False, 4096, 8), "llama32_3b_sft": (1, 1, None, 1, False, 4096, 8),
    "llama3_8b_sft": (2, 1, None, 1, False, 4096, 8), "llama31_8b_sft": (2, 1, None, 1, False, 4096, 8),
    "llama3_70b_sft": (8, 4, None, 1, False, 4096, 8), "llama31_70b_sft": (8, 4, None, 1, False, 4096, 8),
    "llama31_405b_sft": (8, 16, None, 1, True, 2048, 16),
    "llama32_1b_lora": (1, 1, None, 1, False, 4096, 8), "llama32_3b_lora": (1, 1, None, 1, False, 4096, 8),
    "llama3_8b_lora": (1, 1, None, 1, False, 4096, 8), "llama31_8b_lora": (1, 1, None, 1, False, 4096, 8),
    "llama3_70b_lora": (8, 1, None, 1, False, 4096, 8), "llama31_70b_lora": (8, 1, None, 1, False, 4096, 8),
    "llama31_405b_lora": (4, 8, 8, 1, True, 2048, 32),
}
LORA = {"llama32_1b": (32, 32), "llama32_3b": (32, 32), "llama3_8b": (8, 16), "llama31_8b": (8, 16),
        "llama3_70b": (16, 32), "llama31_70b": (16, 32), "llama31_405b": (16, 32)}
ALL_LINEAR = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


@pytest.fixture(scope="module", autouse=True)
def _no_model_is_built(request):
    """Fail any test here that builds a model: configs must be checkable without one."""
    from bridge_convert.provider import GPTModelProvider

    original = GPTModelProvider.provide

    def refuse(self, *args, **kwargs):
        raise AssertionError("a model was built while only building / validating a config")

    GPTModelProvider.provide = refuse
    yield
    GPTModelProvider.provide = original


def _build(name: str, **kwargs):
    recipe = RECIPES[name]
    if recipe.is_finetune:
        kwargs.setdefault("allow_random_init", True)
    return recipe.build(**kwargs)


@pytest.mark.parametrize("name", [n for n in RECIPES if not n.endswith(("_lora", "_dora"))])
def test_recipe_builds_validates_and_has_the_published_values(name):
    cfg = _build(name)
    model = cfg.model
    tp, pp, vp, cp, sp, seq, gbs = PUBLISHED[name]
    assert (model.tensor_model_parallel_size, model.pipeline_model_parallel_size) == (tp, pp)
    assert (model.virtual_pipeline_model_parallel_size, model.context_parallel_size) == (vp, cp)
    assert model.sequence_parallel is sp and model.seq_length == seq == cfg.dataset.seq_length
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (gbs, 1)
    opt = cfg.optimizer
    assert opt.optimizer == "adam" and opt.use_distributed_optimizer and cfg.ddp.use_distributed_optimizer
    assert (opt.adam_beta1, opt.adam_eps, opt.weight_decay, opt.clip_grad) == (0.9, 1e-5, 0.1, 1.0)
    # Megatron Bridge's optimizer helper holds the applied weight decay at 0.033, fine-tuning included
    assert (cfg.scheduler.start_weight_decay, cfg.scheduler.end_weight_decay) == (0.033, 0.033)
    assert cfg.mixed_precision == "bf16_mixed" and cfg.scheduler.lr_decay_style == "cosine"
    if name.endswith("_pretrain"):
        assert (opt.lr, opt.min_lr, cfg.scheduler.lr_warmup_iters, opt.adam_beta2) == (3e-4, 3e-5, 2000, 0.95)
        assert cfg.train.train_iters == 1_168_251 and cfg.dataset.mock and cfg.peft is None
    else:
        assert (opt.lr, opt.min_lr, cfg.scheduler.lr_warmup_iters, opt.adam_beta2) == (5e-6, 0.0, 50, 0.98)
        assert cfg.train.train_iters == 1000 and cfg.rng.seed == 5678 and cfg.dataset.packed
    cfg.validate(world_size=tp * pp * cp)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_model_fields_equal_the_hf_config(model_name):
    spec = MODELS[model_name].SPEC
    layers, hidden, heads, kv, ffn, _, factor, tied, head_dim = HF_VALUES[spec.display_name]
    model = MODELS[model_name].pretrain_config().model
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (layers, hidden, heads)
    assert (model.num_query_groups, model.ffn_hidden_size, model.vocab_size) == (kv, ffn, 128256)
    assert model.kv_channels is None and hidden // heads == head_dim  # derived at finalize()
    assert model.rotary_base == 500000.0 and model.share_embeddings_and_output_weights is tied
    assert model.layernorm_epsilon == 1e-5 and model.normalization == "RMSNorm" and model.gated_linear_unit
    assert model.activation_func is torch.nn.functional.silu and not model.add_bias_linear
    assert model.hf_architecture == "LlamaForCausalLM"
    assert model.rope_scaling is (factor is not None)
    if factor is not None:
        assert (model.rope_scaling_factor, model.rope_scaling_low_freq_factor) == (factor, 1.0)
        assert (model.rope_scaling_high_freq_factor, model.rope_scaling_original_max_position_embeddings) == (4.0, 8192)
    finalized = model.replace(pipeline_model_parallel_layout=None, pipeline_model_parallel_size=1,
                              virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
                              sequence_parallel=False, tensor_model_parallel_size=1).finalize()
    assert finalized.kv_channels == head_dim


@pytest.mark.parametrize("name", [n for n in RECIPES if n.endswith(("_lora", "_dora"))])
def test_peft_recipes_carry_bridge_peft_methods(name):
    import bridge_peft

    cfg = _build(name)
    tp, pp, vp, cp, sp, seq, gbs = PUBLISHED[name.replace("_dora", "_lora")]
    model = cfg.model
    assert (model.tensor_model_parallel_size, model.pipeline_model_parallel_size, model.sequence_parallel) == \
        (tp, pp, sp)
    assert (cfg.train.global_batch_size, model.seq_length, cfg.optimizer.lr) == (gbs, seq, 1e-4)
    assert type(cfg.peft) is (bridge_peft.DoRA if name.endswith("_dora") else bridge_peft.LoRA)
    model_name = name.rsplit("_", 1)[0]
    dim, alpha = LORA[model_name]
    if name.endswith("_dora") and model_name.startswith("llama32"):
        alpha = 64  # Megatron Bridge's DoRA defaults for the 3.2 models
    assert (cfg.peft.dim, cfg.peft.alpha) == (dim, alpha)
    assert list(cfg.peft.target_modules) == (["linear_qkv"] if model_name == "llama31_405b" else ALL_LINEAR)
    cfg.validate(world_size=tp * pp * cp)


def test_405b_counts_embedding_and_loss_in_the_pipeline_split():
    assert pipeline_layout_with_embedding_and_loss(126, 16) == "Et*7|(t*8|)*14t*7L"
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    stages = [[kind.name for kind in stage] for stage in
              PipelineParallelLayerLayout.parse_str_to_list(pipeline_layout_with_embedding_and_loss(126, 64))]
    assert len(stages) == 64 and stages[0] == ["embedding", "decoder"] and stages[-1] == ["decoder", "loss"]
    assert sum(s.count("decoder") for s in stages) == 126 and all(len(s) == 2 for s in stages)
    cfg = _build("llama31_405b_sft")
    assert cfg.model.pipeline_model_parallel_layout == pipeline_layout_with_embedding_and_loss(126, 16)
    with pytest.raises(ValueError, match="do not split evenly"):
        pipeline_layout_with_embedding_and_loss(125, 16)


def test_finetuning_without_weights_says_a_checkpoint_is_needed(tmp_path):
    from bridge_train import ConfigError

    cfg = MODELS["llama32_1b"].sft_config()
    with pytest.raises(ConfigError, match="checkpoint.pretrained_checkpoint at the weights to fine-tune"):
        cfg.validate(world_size=1)
    cfg.checkpoint.pretrained_checkpoint = str(tmp_path / "Llama-3.2-1B")
    with pytest.raises(ConfigError, match="Llama-3.2-1B does not exist; point it at an HF model directory"):
        cfg.validate(world_size=1)
    (tmp_path / "Llama-3.2-1B").mkdir()
    cfg.validate(world_size=1)


def test_hf_path_must_be_the_recipes_model(tmp_path):
    from bridge_convert.testing import save_tiny_hf_checkpoint

    path = save_tiny_hf_checkpoint(tmp_path / "tiny", "llama32")
    with pytest.raises(ValueError, match=r"is not a Llama-3.2-1B checkpoint: num_hidden_layers 2 \(recipe: 16\)"):
        MODELS["llama32_1b"].pretrain_config(hf_path=path)


def test_recipe_functions_take_keywords_and_document_them():
    fn = MODELS["llama3_8b"].peft_config
    assert list(inspect.signature(fn).parameters)[:3] == ["peft", "dim", "alpha"]
    assert fn.__doc__.startswith("Meta-Llama-3-8B: LoRA or DoRA") and fn.__module__ == "bridge_recipes.llama.llama3_8b"
    with pytest.raises(TypeError, match="keyword arguments only"):
        MODELS["llama3_8b"].pretrain_config("/models/x")
    cfg = MODELS["llama3_8b"].pretrain_config(seq_length=4096, global_batch_size=64, train_iters=10, lr=1e-4,
                                              min_lr=1e-5, lr_warmup_iters=2, dir="/runs/x")
    assert (cfg.model.seq_length, cfg.dataset.seq_length, cfg.train.global_batch_size) == (4096, 4096, 64)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.scheduler.lr_warmup_iters) == (1e-4, 1e-5, 2)
    assert cfg.checkpoint.save == cfg.checkpoint.load == "/runs/x/checkpoints" and cfg.checkpoint.save_interval == 500
    assert cfg.logger.tensorboard_dir == "/runs/x/tensorboard"
    sft = MODELS["llama3_8b"].sft_config(allow_random_init=True)
    assert sft.dataset.pad_to_multiple_of == 1 and sft.tokenizer is None
    assert MODELS["llama31_405b"].sft_config(allow_random_init=True).dataset.pad_to_multiple_of == 8  # TP 8 with SP


@pytest.mark.parametrize("model_name,lora,dora", [("llama32_1b", (32, 32), (32, 64)), ("llama32_3b", (32, 32), (32, 64)),
                                                  ("llama3_8b", (8, 16), (8, 16)), ("llama31_405b", (16, 32), (16, 32))])
def test_adapter_settings_are_megatron_bridges_per_method(model_name, lora, dora):
    """Megatron Bridge's 3.2 DoRA recipes take its DoRA defaults (dim 32, alpha 64); the others set both."""
    module = MODELS[model_name]
    for method, (dim, alpha) in (("lora", lora), ("dora", dora)):
        peft = module.peft_config(peft=method, allow_random_init=True).peft
        assert (type(peft).__name__, peft.dim, peft.alpha) == ({"lora": "LoRA", "dora": "DoRA"}[method], dim, alpha)
    with pytest.raises(ValueError, match="dim"):  # 0 is a value (refused), not "the recipe's default"
        module.peft_config(dim=0, allow_random_init=True)
