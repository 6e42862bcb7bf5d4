"""finetune(): an imported tiny HF Llama trained on packed chat SFT data, exported and reloaded by transformers."""

from __future__ import annotations

import random

import pytest
import torch

from bridge_convert import AutoBridge
from bridge_convert.testing import run_multiprocess, save_tiny_hf_checkpoint
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


def _sft_losses(root: str, micro_batch_size: int, per_token: bool) -> list[float]:
    """Four iterations of unpacked chat SFT (answers of different lengths: the loss-token count varies per row)."""
    from pathlib import Path

    from bridge_data import SFTDataConfig, TokenizerConfig

    root = Path(root)
    provider = AutoBridge.from_hf_pretrained(root / "base").to_megatron_provider(load_weights=True)
    provider.calculate_per_token_loss = per_token
    cfg = ConfigContainer(
        model=provider,
        train=TrainConfig(train_iters=4, micro_batch_size=micro_batch_size, global_batch_size=4),
        tokenizer=TokenizerConfig(tokenizer_type="hf", path=str(root / "tokenizer")),
        dataset=SFTDataConfig(path=str(root / "sft.jsonl"), seq_length=64, packed=False, split="100,0,0"),
        optimizer=OptimizerConfig(lr=5e-3, min_lr=5e-4, clip_grad=1.0),
        scheduler=SchedulerConfig(lr_warmup_iters=1),
        logger=LoggerConfig(log_interval=4, print_config=False, progress_bar=False),
    )
    return list(finetune(cfg))


def _sft_inputs(tmp_path) -> str:
    save_tiny_tokenizer(tmp_path / "tokenizer")
    save_tiny_hf_checkpoint(tmp_path / "base", "llama", vocab_size=320, seed=1)
    rng = random.Random(1)  # answers of 1 to 12 words: the loss-token count differs from row to row
    answers = make_texts(32, seed=9, max_words=12)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": " ".join(
        a.split()[:rng.randint(1, 12)])}]} for q, a in zip(make_texts(32, seed=5, max_words=8), answers)]
    write_jsonl(tmp_path / "sft.jsonl", rows)
    return str(tmp_path)


def test_per_token_loss_does_not_depend_on_the_micro_batch_split(tmp_path):
    # model.calculate_per_token_loss: every loss token of the global batch weighs the same, so one micro-batch of 4
    # and four of 1 give the same losses; the default (the mean per micro-batch, averaged) weighs a short answer's
    # tokens more, and differs (the control: this data tells the two apart).
    root = _sft_inputs(tmp_path)
    per_token = {mbs: _sft_losses(root, mbs, True) for mbs in (1, 4)}
    mean = {mbs: _sft_losses(root, mbs, False) for mbs in (1, 4)}
    torch.testing.assert_close(per_token[1], per_token[4], rtol=0, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(mean[1], mean[4])) > 1e-3, mean


def _sft_losses_dp(root: str) -> list[float]:
    return _sft_losses(root, 1, True)


@pytest.mark.multiproc
def test_per_token_loss_over_two_data_parallel_ranks_matches_one_process(tmp_path):
    # The token counts of both ranks add up before the gradients are divided (megatron-core's finalize step).
    root = _sft_inputs(tmp_path)
    reference = _sft_losses(root, 4, True)
    for losses in run_multiprocess(_sft_losses_dp, 2, root):
        torch.testing.assert_close(losses, reference, rtol=0, atol=1e-5)


def _recorded_sft_run(root: str, ckpt: str, *, train_iters: int, global_batch_size: int, dataset=None):
    """Unpacked chat SFT saving at the end into ``ckpt`` (resumed from it); returns the token rows it trained on."""
    from pathlib import Path

    from bridge_data import SFTDataConfig, TokenizerConfig
    from bridge_train.forward_step import gpt_forward_step

    root = Path(root)
    cfg = ConfigContainer(
        model=AutoBridge.from_hf_pretrained(root / "base").to_megatron_provider(load_weights=False),
        train=TrainConfig(train_iters=train_iters, micro_batch_size=2, global_batch_size=global_batch_size),
        tokenizer=TokenizerConfig(tokenizer_type="hf", path=str(root / "tokenizer")),
        dataset=dataset or SFTDataConfig(path=str(root / "sft.jsonl"), seq_length=64, packed=False,
                                         split="100,0,0"),
        optimizer=OptimizerConfig(lr=5e-3, min_lr=5e-4),
        scheduler=SchedulerConfig(lr_warmup_iters=1),
        checkpoint=CheckpointConfig(save=ckpt, load=ckpt, pretrained_checkpoint=str(root / "base")),
        logger=LoggerConfig(log_interval=10, print_config=False, progress_bar=False),
    )
    rows = []

    def recording(data_iterator, model):
        batch = next(data_iterator)
        rows.extend(batch["tokens"].clone())
        return gpt_forward_step(iter([batch]), model)

    finetune(cfg, recording)
    return cfg, rows


def test_resume_with_a_smaller_global_batch_reads_on_where_the_saved_run_stopped(tmp_path):
    # The saved run read 4 x 8 = 32 samples; the resumed one reads 2 x 4 more. Its dataset was sized
    # train_iters x global_batch_size = 24 samples: the resume ran out of data at once (a bare StopIteration).
    from megatron.core import dist_checkpointing

    from bridge_data import build_tokenizer

    root = _sft_inputs(tmp_path)
    ckpt = str(tmp_path / "ckpt")
    _, first = _recorded_sft_run(root, ckpt, train_iters=4, global_batch_size=8)
    cfg, second = _recorded_sft_run(root, ckpt, train_iters=6, global_batch_size=4)
    assert len(first) == 32 and len(second) == 8
    # the oracle: the samples at positions [0, 40) of the dataset's order (each epoch in its own seeded order)
    dataset = cfg.dataset.build(build_tokenizer(cfg.tokenizer), train_samples=40)[0]
    expected = [dataset[i]["tokens"] for i in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(first + second, expected))
    saved = dist_checkpointing.load_common_state_dict(f"{ckpt}/iter_0000006")["train_state"]
    assert saved["consumed_train_samples"] == 40


def test_a_dataset_that_runs_out_is_named(tmp_path):
    from bridge_data import SFTDataConfig

    class OneEpoch(SFTDataConfig):  # a user's dataset config that ignores the sample counts it is asked for
        def build(self, tokenizer, **sizes):
            return super().build(tokenizer)

    root = _sft_inputs(tmp_path)
    dataset = OneEpoch(path=f"{root}/sft.jsonl", seq_length=64, packed=False, split="100,0,0")
    from bridge_train.setup import TrainingDataExhaustedError

    with pytest.raises(TrainingDataExhaustedError, match=r"the training data ran out: the dataset holds 32 samples and 32 have "
                                           r"been read; .*train.train_iters x train.global_batch_size"):
        _recorded_sft_run(root, str(tmp_path / "ckpt"), train_iters=5, global_batch_size=8, dataset=dataset)
