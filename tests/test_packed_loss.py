"""bridge-data's packed SFT rows through bridge-convert's native spec: no attention across documents.

The per-token loss of every document inside a packed row equals the loss of that document run alone (fp32).
"""

from __future__ import annotations

import random

import pytest
import torch

from bridge_convert import GPTModelProvider
from bridge_convert.runtime import initialize_parallel
from bridge_data import (
    SFTDataConfig,
    TokenizerConfig,
    build_tokenizer,
    collate_samples,
    packed_seq_params_from_batch,
)
from bridge_data.testing import make_texts, save_tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def packed_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    tokenizer = build_tokenizer(TokenizerConfig(path=save_tiny_tokenizer(root / "tok")))
    rng = random.Random(3)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(WORDS)}]}
            for q in make_texts(40, seed=9, max_words=10)]
    data = write_jsonl(root / "sft.jsonl", rows)
    train, _, _ = SFTDataConfig(path=data, seq_length=96, packed=True, split="100,0,0").build(tokenizer)
    return tokenizer, [train[i] for i in range(3)]


WORDS = ["paris.", "twelve.", "the quick fox.", "hello world."]


@pytest.mark.parametrize("impl", ["native"])
def test_packed_document_losses_equal_documents_alone(packed_rows, impl):
    tokenizer, samples = packed_rows
    initialize_parallel()
    provider = GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                ffn_hidden_size=128, vocab_size=tokenizer.vocab_size, seq_length=96,
                                make_vocab_size_divisible_by=64, transformer_impl=impl)
    model = provider.provide_distributed_model(wrap_with_ddp=False)[0].eval()
    checked = 0
    for sample in samples:
        batch = collate_samples([sample])
        params = packed_seq_params_from_batch(batch)
        cu = [int(x) for x in sample["cu_seqlens"] if x >= 0]
        assert len(cu) >= 3, "the row should pack several documents"
        with torch.no_grad():
            packed = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                           packed_seq_params=params)[0]
            for start, end in zip(cu[:-1], cu[1:]):
                tokens = sample["tokens"][start:end].unsqueeze(0)
                alone = model(tokens, torch.arange(end - start).unsqueeze(0), None,
                              labels=sample["labels"][start:end].unsqueeze(0))[0]
                torch.testing.assert_close(packed[start:end], alone, rtol=0, atol=1e-5)
                assert torch.equal(sample["position_ids"][start:end], torch.arange(end - start))
                checked += 1
            # Negative control: the same row without document boundaries lets later documents see earlier ones.
            leaky = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])[0]
            assert (leaky[cu[1]:cu[-1]] - packed[cu[1]:cu[-1]]).abs().max() > 1e-3
    assert checked >= 6
