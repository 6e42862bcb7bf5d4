"""SFT / PEFT data: mock conversations (answer-only loss, packing, sizes, seeds) and the SQuAD preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bridge_recipes.sft_data import MockSFTDataConfig, sft_data_config


class _NullTokenizer:
    vocab_size, eod, pad = 100, 99, 99


def _segments(sample):
    bounds = sample["cu_seqlens"].tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def test_mock_sft_rows_train_only_on_an_answer_that_copies_the_prompt():
    cfg = MockSFTDataConfig(seq_length=64, seed=3)
    train, valid, test = cfg.build(_NullTokenizer(), train_samples=10, valid_samples=3)
    assert (len(train), len(valid), test) == (10, 3, None)
    seen = 0
    for sample in train:
        assert sample["tokens"].shape == (64,) and sample["loss_mask"].dtype == torch.float32
        for start, end in _segments(sample):
            tokens, labels = sample["tokens"][start:end], sample["labels"][start:end]
            mask = sample["loss_mask"][start:end].bool()
            assert torch.equal(sample["position_ids"][start:end], torch.arange(end - start))
            if not mask.any():  # the padding at the end of a row
                continue
            seen += 1
            trained = labels[mask]
            first = int(mask.nonzero()[0])  # the last prompt position predicts the first answer token
            assert mask[first:first + len(trained)].all() and int(trained[-1]) == 99  # answer, then eod
            assert torch.equal(trained[:-1], tokens[:len(trained) - 1])  # the answer copies the prompt's start
            assert (tokens[:first + 1] != 99).all()  # no eod inside the prompt
    assert seen >= 20  # several conversations per packed row


def test_mock_sft_is_seeded_and_unpacked_rows_are_single_sequences():
    a = MockSFTDataConfig(seq_length=32, seed=1).build(_NullTokenizer(), train_samples=4)[0]
    b = MockSFTDataConfig(seq_length=32, seed=1).build(_NullTokenizer(), train_samples=4)[0]
    c = MockSFTDataConfig(seq_length=32, seed=2).build(_NullTokenizer(), train_samples=4)[0]
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(4))
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(4))
    unpacked = MockSFTDataConfig(seq_length=32, packed=False).build(_NullTokenizer(), train_samples=5)[0]
    sample = unpacked[0]
    assert len(unpacked) == 5 and "cu_seqlens" not in sample and sample["tokens"].shape == (32,)
    assert (sample["tokens"] == 99).sum() >= 1 and sample["loss_mask"].sum() >= 1


@pytest.mark.parametrize("changes,message", [
    ({"min_length": 40}, "min_length (40) <= max_length"),
    ({"answer_fraction": 1.5}, "answer_fraction must be in (0, 1)"),
    ({"pad_to_multiple_of": 5}, "must be a multiple of pad_to_multiple_of (5)"),
])
def test_mock_sft_rejects_bad_settings(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MockSFTDataConfig(seq_length=32, **changes).build(_NullTokenizer(), train_samples=1)


def test_squad_preset_reads_an_hf_datasets_directory_with_answer_only_loss(tmp_path):
    from datasets import Dataset

    from bridge_data import TokenizerConfig, build_tokenizer
    from bridge_data.testing import save_tiny_tokenizer

    rows = [{"id": str(i), "title": "t", "context": f"the fox number {i} sat on a mat", "question": "who sat?",
             "answers": {"text": [f"fox {i}"], "answer_start": [4]}} for i in range(6)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "squad"))
    tokenizer = build_tokenizer(TokenizerConfig(path=save_tiny_tokenizer(tmp_path / "tok")))
    cfg = sft_data_config(seq_length=96, data_path=str(tmp_path / "squad"), data_format="squad", packed=False,
                          pad_to_multiple_of=1, seed=0)
    assert (cfg.schema, cfg.use_chat_template) == ("squad", False)
    train, _, _ = cfg.build(tokenizer)
    assert len(train) == 6
    for row, sample in zip(rows, train):
        trained = sample["labels"][sample["loss_mask"].bool()].tolist()
        assert trained[-1] == tokenizer.eod
        assert tokenizer.detokenize(trained[:-1]).strip() == row["answers"]["text"][0]
        prompt = tokenizer.detokenize(sample["tokens"][: int(sample["loss_mask"].nonzero()[0]) + 1].tolist())
        assert row["context"] in prompt and row["question"] in prompt
    packed = sft_data_config(seq_length=96, data_path=str(tmp_path / "squad"), data_format="squad", packed=True,
                             pad_to_multiple_of=1, seed=0)
    assert "cu_seqlens" in packed.build(tokenizer, train_samples=2)[0][0]
    with pytest.raises(ValueError, match="data_format must be 'chat' or 'squad'"):
        sft_data_config(seq_length=8, data_path="x.jsonl", data_format="alpaca", packed=True, pad_to_multiple_of=1,
                        seed=0)


def test_lengths_default_to_fractions_of_the_row():
    cfg = MockSFTDataConfig(seq_length=4096)
    lengths = [len(ids) for ids, _ in cfg.sequences(_NullTokenizer(), 200, 0)]
    assert min(lengths) >= 512 and max(lengths) <= 2048 and np.std(lengths) > 100
