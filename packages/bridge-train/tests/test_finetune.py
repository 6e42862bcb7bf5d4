"""finetune(): an imported tiny HF Llama trained on packed chat SFT data, exported and reloaded by transformers."""

from __future__ import annotations

import random

import torch

from bridge_convert import AutoBridge
from bridge_convert.testing import save_tiny_hf_checkpoint
from bridge_data.testing import make_texts, save_tiny_tokenizer, write_jsonl
from bridge_train import (
    CheckpointConfig,
    ConfigContainer,
    LoggerConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
    finetune,
)


def _chat_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    questions = make_texts(n, seed=5, max_words=8)
    return [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": rng.choice(["paris.", "twelve.", "the fox."])}]}
            for q in questions]


def _hf_loss(model_dir, tokenizer_dir, rows) -> float:
    """Mean next-token loss of transformers' own forward over the chat texts (an independent oracle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for row in rows:
            text = tok.apply_chat_template(row["messages"], tokenize=False)
            ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
            losses.append(model(ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


def test_finetune_packed_sft_then_export_reloads_with_trained_weights(tmp_path):
    from bridge_data import SFTDataConfig, TokenizerConfig

    tokenizer_dir = save_tiny_tokenizer(tmp_path / "tokenizer")
    base = save_tiny_hf_checkpoint(tmp_path / "base", "llama", vocab_size=320, seed=1)
    rows = _chat_rows(64)
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    provider = AutoBridge.from_hf_pretrained(base).to_megatron_provider(load_weights=False)
    cfg = ConfigContainer(
        model=provider,
        train=TrainConfig(train_iters=12, micro_batch_size=2, global_batch_size=4),
        tokenizer=TokenizerConfig(tokenizer_type="hf", path=tokenizer_dir),
        dataset=SFTDataConfig(path=data, seq_length=64, packed=True, split="90,10,0"),
        optimizer=OptimizerConfig(lr=5e-3, min_lr=5e-4, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=2),
        checkpoint=CheckpointConfig(save=str(tmp_path / "ckpt"), save_hf=True, pretrained_checkpoint=base),
        logger=LoggerConfig(log_interval=4, print_config=False, progress_bar=False),
    )
    losses = finetune(cfg)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses

    exported = tmp_path / "ckpt" / "iter_0000012" / "hf"
    assert _hf_loss(exported, tokenizer_dir, rows) < _hf_loss(base, tokenizer_dir, rows) - 0.3
    # A second, independent path (bridge-convert's export of the Megatron checkpoint) gives the same weights.
    AutoBridge.export_ckpt(tmp_path / "ckpt", tmp_path / "exported-again")
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "exported-again").state_dict()
    base_sd = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], base_sd["model.layers.0.mlp.down_proj.weight"])
