"""Fixtures for bridge-data's tests: a small BPE tokenizer trained offline, saved as an HF tokenizer directory
with a chat template, and small generated corpora. Nothing is downloaded."""

from __future__ import annotations

import pytest

from bridge_data.testing import make_texts as _make_texts
from bridge_data.testing import save_tiny_tokenizer as _save_tokenizer
from bridge_data.testing import write_jsonl as _write_jsonl
from bridge_data.tokenizers import TokenizerConfig, build_tokenizer


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
