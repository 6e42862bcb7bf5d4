"""Fixtures for bridge-data's tests: a small BPE tokenizer trained offline, saved as an HF tokenizer directory
with a chat template, and small generated corpora. Nothing is downloaded."""

from __future__ import annotations

import json
import random

import pytest

from bridge_data.tokenizers import TokenizerConfig, build_tokenizer

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "what", "is", "answer", "question",
         "context", "paris", "capital", "france", "seven", "plus", "five", "equals", "twelve", "hello", "world",
         "model", "data", "token", "train", "loss"]


def _make_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 20) -> list[str]:
    """``n`` deterministic sentences of random words (with some punctuation and digits)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        texts.append(" ".join(words) + rng.choice([".", "?", "!", f" {i}."]))
    return texts


def _write_jsonl(path, rows: list[dict]) -> str:
    """Write ``rows`` as JSON lines to ``path``; return the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _save_tokenizer(path, *, chat_template: str | None = CHAT_TEMPLATE, pad: bool = True) -> str:
    """Train a byte-level BPE (vocab 320) on generated text and save it as an HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_make_texts(400, seed=1), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                 pad_token="<|pad|>" if pad else None)
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """An HF tokenizer directory with a chat template."""
    return _save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The bridge-data tokenizer of :func:`tokenizer_dir`."""
    return build_tokenizer(TokenizerConfig(path=tokenizer_dir))


@pytest.fixture(scope="session")
def plain_tokenizer(tmp_path_factory):
    """A tokenizer without chat template and without pad token."""
    path = _save_tokenizer(tmp_path_factory.mktemp("plain-tokenizer"), chat_template=None, pad=False)
    return build_tokenizer(TokenizerConfig(path=path))


@pytest.fixture
def corpus_jsonl(tmp_path):
    """Factory: ``corpus_jsonl(n, seed=0, key="text")`` -> (path, texts) of a generated JSONL corpus."""

    def make(n: int = 50, *, seed: int = 0, key: str = "text", name: str = "corpus.jsonl"):
        texts = _make_texts(n, seed=seed)
        return _write_jsonl(tmp_path / name, [{key: t, "id": i} for i, t in enumerate(texts)]), texts

    return make


@pytest.fixture(scope="session")
def make_texts():
    """``make_texts(n, seed=0, min_words=3, max_words=20)`` -> deterministic sentences."""
    return _make_texts


@pytest.fixture(scope="session")
def write_jsonl():
    """``write_jsonl(path, rows)`` -> path (str) of the JSON-lines file written."""
    return _write_jsonl


@pytest.fixture(scope="session")
def save_tokenizer():
    """``save_tokenizer(path, chat_template=..., pad=True)`` -> path of a saved HF tokenizer directory."""
    return _save_tokenizer
