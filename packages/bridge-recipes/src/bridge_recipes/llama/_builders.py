"""The three recipe builders every Llama model shares: pretrain, full-parameter SFT, LoRA / DoRA.

Each returns a bridge-train ``ConfigContainer`` (not finalized: edit it, apply overrides, then train). Values are
Megatron Bridge's published ones (distributed Adam with betas 0.9 / 0.95 (0.98 for fine-tuning), eps 1e-5, weight
decay 0.1 held at 0.033 by the scheduler, clip 1.0, cosine schedules, ``bf16_mixed``); the model's layout and batch
sizes come from its :class:`LlamaSpec`.
Building a config reads no file but ``hf_path``'s config.json and builds no model.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ._spec import LlamaSpec, Parallelism

if TYPE_CHECKING:
    from bridge_train import ConfigContainer

__all__ = ["peft_config", "pipeline_layout_with_embedding_and_loss", "pretrain_config", "recipe_functions",
           "sft_config"]

PRETRAIN_ITERS = 1_168_251
"""Megatron Bridge's pretraining length (``train_iters``)."""
_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "vocab_size")


def pipeline_layout_with_embedding_and_loss(num_layers: int, stages: int) -> str:
    """megatron-core layout string splitting ``num_layers`` over ``stages`` (PP x VP) pipeline chunks with the
    embedding counted as a layer of the first chunk and the loss as one of the last (405B: 126 + 2 = 128 slots).

    Raises:
        ValueError: if ``num_layers + 2`` is not divisible by ``stages``.
    """
    if stages < 2 or (num_layers + 2) % stages:
        raise ValueError(f"{num_layers} layers + embedding + loss do not split evenly over {stages} pipeline stages")
    per = (num_layers + 2) // stages
    middle = f"(t*{per}|)*{stages - 2}" if stages > 2 else ""
    return f"E{f't*{per - 1}' if per > 1 else ''}|{middle}{f't*{per - 1}' if per > 1 else ''}L"


def _check_shape(spec: LlamaSpec, raw: dict[str, Any], hf_path: str) -> None:
    expected = spec.hf_config()
    wrong = [f"{key} {raw.get(key)!r} (recipe: {expected[key]!r})" for key in _SHAPE_KEYS
             if raw.get(key) != expected[key]]
    if wrong:
        raise ValueError(f"hf_path {hf_path!r} is not a {spec.display_name} checkpoint: {', '.join(wrong)}; use that "
                         "model's recipe, or set cfg.model = AutoBridge.from_hf_pretrained(path).to_megatron_provider()")


def _provider(spec: LlamaSpec, hf_path: str | None, layout: Parallelism, seq_length: int, *, load_weights: bool):
    """The model: the shipped config (random init), or ``hf_path``'s (its weights loaded when ``load_weights``)."""
    from bridge_convert import AutoBridge

    if hf_path is None:
        bridge = AutoBridge.from_hf_config(spec.hf_config())
    else:
        bridge = AutoBridge.from_hf_pretrained(hf_path)
        _check_shape(spec, bridge.hf_config, str(hf_path))
    provider = bridge.to_megatron_provider(load_weights=load_weights and hf_path is not None)
    if provider.kv_channels == provider.hidden_size // provider.num_attention_heads:
        provider.kv_channels = None  # derived again at finalize(), so shrinking hidden / heads by override works
    provider.seq_length = seq_length
    provider.tensor_model_parallel_size = layout.tp
    provider.pipeline_model_parallel_size = layout.pp
    provider.virtual_pipeline_model_parallel_size = layout.vp
    provider.context_parallel_size = layout.cp
    provider.sequence_parallel = layout.sp
    if spec.pipeline_split_counts_embedding_and_loss and layout.pp > 1:
        provider.pipeline_model_parallel_layout = pipeline_layout_with_embedding_and_loss(
            provider.num_layers, layout.pp * (layout.vp or 1))
    return provider


def _container(*, provider, train_iters: int, global_batch_size: int, micro_batch_size: int, lr: float,
               min_lr: float, warmup: int, beta2: float, eval_interval: int, save_interval: int, dir: str | None,
               seed: int, dataset, tokenizer, mixed_precision: str | None):
    from bridge_train import (
        CheckpointConfig,
        ConfigContainer,
        DDPConfig,
        LoggerConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TrainConfig,
    )

    from ..peft_methods import register_with_bridge_train

    register_with_bridge_train()
    checkpoint = CheckpointConfig()
    logger = LoggerConfig(log_interval=10)
    if dir is not None:
        checkpoint = CheckpointConfig(save=os.path.join(dir, "checkpoints"), load=os.path.join(dir, "checkpoints"),
                                      save_interval=save_interval)
        logger.tensorboard_dir = os.path.join(dir, "tensorboard")
    scheduler = SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=warmup, lr_warmup_init=0.0)
    # Megatron Bridge's optimizer helper (pretraining and fine-tuning): the scheduler holds weight decay at 0.033
    scheduler.start_weight_decay = scheduler.end_weight_decay = 0.033
    return ConfigContainer(
        model=provider,
        train=TrainConfig(train_iters=train_iters, micro_batch_size=micro_batch_size,
                          global_batch_size=global_batch_size, eval_interval=eval_interval, eval_iters=32),
        dataset=dataset,
        tokenizer=tokenizer,
        optimizer=OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=0.1, adam_beta1=0.9,
                                  adam_beta2=beta2, adam_eps=1e-5, clip_grad=1.0, use_distributed_optimizer=True,
                                  overlap_param_gather=True),
        scheduler=scheduler,
        ddp=DDPConfig(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True,
                      grad_reduce_in_fp32=True, average_in_collective=True),
        checkpoint=checkpoint,
        logger=logger,
        rng=RNGConfig(seed=seed),
        mixed_precision=mixed_precision,
    )


def _tokenizer(path: str | None):
    if path is None:
        return None
    from bridge_data import TokenizerConfig

    return TokenizerConfig(tokenizer_type="hf", path=str(path))


def pretrain_config(spec: LlamaSpec, *, hf_path: str | None = None, dir: str | None = None,
                    data_paths: list[str] | None = None, tokenizer_path: str | None = None,
                    seq_length: int | None = None, train_iters: int = PRETRAIN_ITERS,
                    global_batch_size: int = 512, micro_batch_size: int = 1, lr: float = 3e-4, min_lr: float = 3e-5,
                    lr_warmup_iters: int = 2000, mixed_precision: str | None = "bf16_mixed",
                    seed: int = 1234) -> ConfigContainer:
    """Pretraining: mock data by default, cosine LR 3e-4 -> 3e-5 after 2000 warmup iterations.

    Args:
        spec: The model.
        hf_path: Local HF checkpoint of this model to continue pretraining from (its weights are loaded); None:
            random initialisation.
        dir: Run directory: checkpoints (every 500 iterations, resumed from) and TensorBoard logs; None: no
            checkpoints, console logging only.
        data_paths: Indexed dataset prefixes (``bridge-data preprocess`` output); None: mock data.
        tokenizer_path: HF tokenizer directory of ``data_paths`` (default: ``hf_path``'s); only its eod id is used.
        seq_length: Sequence length; None: the recipe's (8192, 131072 for Llama 3.1 70B / 405B).
        train_iters: Optimizer steps.
        global_batch_size: Samples per step over all data-parallel ranks.
        micro_batch_size: Samples per forward pass.
        lr: Peak learning rate.
        min_lr: Final learning rate of the cosine decay.
        lr_warmup_iters: Linear warmup length.
        mixed_precision: A bridge-train precision recipe name; None leaves the model in its checkpoint dtype.
        seed: Seed of initialisation and data.
    """
    from bridge_data import PretrainDataConfig

    seq = spec.pretrain_seq_length if seq_length is None else seq_length
    provider = _provider(spec, hf_path, spec.pretrain, seq, load_weights=True)
    tokenizer_source = tokenizer_path or (hf_path if data_paths else None)
    return _container(
        provider=provider, train_iters=train_iters, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, lr=lr, min_lr=min_lr, warmup=lr_warmup_iters, beta2=0.95,
        eval_interval=2000, save_interval=500, dir=dir, seed=seed,
        dataset=PretrainDataConfig(seq_length=seq, paths=list(data_paths or []), mock=not data_paths, seed=seed),
        tokenizer=_tokenizer(tokenizer_source), mixed_precision=mixed_precision)


def _finetune(spec: LlamaSpec, layout: Parallelism, global_batch_size: int | None, *, hf_path, dir, data_path,
              data_format, tokenizer_path, packed, seq_length, train_iters, micro_batch_size, lr, min_lr,
              lr_warmup_iters, allow_random_init, mixed_precision, seed, default_batch: int):
    from bridge_train.config.invariants import row_multiple

    from .. import sft_data

    seq = spec.finetune_seq_length if seq_length is None else seq_length
    provider = _provider(spec, hf_path, layout, seq, load_weights=False)  # loaded by finetune() from the path
    multiple = row_multiple(provider)
    tokenizer_source = tokenizer_path or hf_path
    if data_path is not None and tokenizer_source is None:
        raise ValueError(f"SFT data from {data_path!r} needs a tokenizer: pass hf_path= or tokenizer_path= "
                         "(bridge-run: --hf-path or --tokenizer-path)")
    if data_path is None and data_format != "chat":  # the mock SFT data reads no file
        raise ValueError(f"data_format={data_format!r} applies to data_path, which is not set (mock SFT data): pass "
                         "data_path= (bridge-run: --data-path), or drop data_format")
    cfg = _container(
        provider=provider, train_iters=train_iters, global_batch_size=default_batch if global_batch_size is None else global_batch_size,
        micro_batch_size=micro_batch_size, lr=lr, min_lr=min_lr, warmup=lr_warmup_iters, beta2=0.98,
        eval_interval=30, save_interval=100, dir=dir, seed=seed,
        dataset=sft_data.sft_data_config(seq_length=seq, data_path=data_path, data_format=data_format,
                                         packed=packed, pad_to_multiple_of=multiple, seed=seed),
        tokenizer=_tokenizer(tokenizer_source if data_path is not None else tokenizer_path),  # mock: its ids
        mixed_precision=mixed_precision)
    if hf_path is not None:
        cfg.checkpoint.pretrained_checkpoint = str(hf_path)
    # Without weights, validation says that a pretrained checkpoint is needed (checkpoint.pretrained_checkpoint),
    # unless random weights were asked for (benchmarks).
    cfg.checkpoint.finetune = not allow_random_init
    return cfg


def sft_config(spec: LlamaSpec, *, hf_path: str | None = None, dir: str | None = None, data_path: str | None = None,
               data_format: Literal["chat", "squad"] = "chat", tokenizer_path: str | None = None,
               packed: bool = True, seq_length: int | None = None, train_iters: int = 1000,
               global_batch_size: int | None = None, micro_batch_size: int = 1, lr: float = 5e-6,
               min_lr: float = 0.0, lr_warmup_iters: int = 50, allow_random_init: bool = False,
               mixed_precision: str | None = "bf16_mixed", seed: int = 5678) -> ConfigContainer:
    """Full-parameter SFT: packed sequences, loss on the answers only, LR 5e-6 cosine to 0 after 50 warmup steps.

    Args:
        spec: The model.
        hf_path: Local HF checkpoint to fine-tune (``checkpoint.pretrained_checkpoint``; its tokenizer reads
            ``data_path``). Without it (and without setting ``checkpoint.pretrained_checkpoint`` later) the config
            does not validate, unless ``allow_random_init``.
        dir: Run directory (checkpoints every 100 iterations, TensorBoard); None: none written.
        data_path: Chat JSONL / Parquet / HF ``datasets`` directory; None: mock SFT data.
        data_format: ``chat`` (any layout bridge-data reads, chat template applied) or ``squad`` (SQuAD rows as
            prompt / completion).
        tokenizer_path: HF tokenizer directory for ``data_path`` (default: ``hf_path``); with the mock data, the
            vocabulary and eod id of its tokens (default: the model's vocabulary).
        packed: Pack sequences into ``seq_length`` rows (offline, first-fit-decreasing).
        seq_length: Row length; None: 4096 (2048 for 405B).
        train_iters: Optimizer steps.
        global_batch_size: None: the recipe's (8; 16 for 405B).
        micro_batch_size: Samples per forward pass.
        lr: Peak learning rate.
        min_lr: Final learning rate.
        lr_warmup_iters: Warmup length.
        allow_random_init: Fine-tune random weights (benchmarks only).
        mixed_precision: Precision recipe name.
        seed: Seed.
    """
    return _finetune(spec, spec.sft, global_batch_size, default_batch=spec.sft_global_batch_size, hf_path=hf_path,
                     dir=dir, data_path=data_path, data_format=data_format, tokenizer_path=tokenizer_path,
                     packed=packed, seq_length=seq_length, train_iters=train_iters,
                     micro_batch_size=micro_batch_size, lr=lr, min_lr=min_lr, lr_warmup_iters=lr_warmup_iters,
                     allow_random_init=allow_random_init, mixed_precision=mixed_precision, seed=seed)


def peft_config(spec: LlamaSpec, *, peft: Literal["lora", "dora", "canonical_lora"] = "lora", dim: int | None = None,
                alpha: int | None = None, target_modules: list[str] | None = None, hf_path: str | None = None,
                dir: str | None = None, data_path: str | None = None, data_format: Literal["chat", "squad"] = "chat",
                tokenizer_path: str | None = None, packed: bool = True, seq_length: int | None = None,
                train_iters: int = 1000, global_batch_size: int | None = None, micro_batch_size: int = 1,
                lr: float = 1e-4, min_lr: float = 0.0, lr_warmup_iters: int = 50, allow_random_init: bool = False,
                mixed_precision: str | None = "bf16_mixed", seed: int = 5678) -> ConfigContainer:
    """LoRA or DoRA fine-tuning (``cfg.peft`` is bridge-peft's ``LoRA`` / ``DoRA``): LR 1e-4, otherwise as SFT.

    Args:
        peft: ``lora``, ``dora`` or ``canonical_lora`` (LoRA's settings, one adapter per projection of
            ``linear_qkv`` / ``linear_fc1``; fused names in ``target_modules`` stand for their projections).
        dim: Adapter rank; None: the recipe's (32 for 3.2 1B / 3B, 8 for 8B, 16 for 70B / 405B).
        alpha: Adapter scale numerator; None: the recipe's (32, DoRA 64 for 3.2 1B / 3B; 16 for 8B; 32 for 70B /
            405B).
        target_modules: Layers to adapt; None: every linear layer (405B: ``linear_qkv`` only).
        Other arguments: as :func:`sft_config` (default global batch 8; 32 for 405B).
    """
    cfg = _finetune(spec, spec.peft, global_batch_size, default_batch=spec.peft_global_batch_size, hf_path=hf_path,
                    dir=dir, data_path=data_path, data_format=data_format, tokenizer_path=tokenizer_path,
                    packed=packed, seq_length=seq_length, train_iters=train_iters,
                    micro_batch_size=micro_batch_size, lr=lr, min_lr=min_lr, lr_warmup_iters=lr_warmup_iters,
                    allow_random_init=allow_random_init, mixed_precision=mixed_precision, seed=seed)
    from ..peft_methods import peft_method

    default_alpha = spec.dora_alpha if peft == "dora" and spec.dora_alpha is not None else spec.lora_alpha
    cfg.peft = peft_method(peft, dim=spec.lora_dim if dim is None else dim,
                           alpha=default_alpha if alpha is None else alpha,
                           target_modules=list(spec.lora_targets if target_modules is None else target_modules))
    return cfg


def recipe_functions(spec: LlamaSpec, module: str) -> tuple[Callable[..., Any], ...]:
    """``pretrain_config``, ``sft_config`` and ``peft_config`` of one model module, with the builders' keyword
    arguments (and docs) minus ``spec``."""
    out = []
    for builder in (pretrain_config, sft_config, peft_config):
        def recipe(*args: Any, _builder=builder, **kwargs: Any):
            if args:
                raise TypeError(f"{_builder.__name__}() takes keyword arguments only, e.g. "
                                f"{_builder.__name__}(train_iters=10)")
            return _builder(spec, **kwargs)

        functools.update_wrapper(recipe, builder, assigned=("__name__", "__qualname__", "__annotations__"))
        recipe.__module__ = module
        recipe.__doc__ = f"{spec.display_name}: {builder.__doc__}"
        signature = inspect.signature(builder)
        recipe.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
        out.append(recipe)
    return tuple(out)
