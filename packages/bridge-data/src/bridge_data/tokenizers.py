"""Tokenizers with one interface for HF tokenizer directories and for mock data (the null tokenizer).

Every tokenizer exposes the raw ``vocab_size`` (number of ids it can emit, unpadded: padding the embedding
for tensor parallelism is the model provider's job), the ``eod``/``pad``/``bos`` ids, ``tokenize`` and
``detokenize``. ``unique_identifiers`` lets megatron-core key its dataset index caches on the tokenizer.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

TokenizerType = Literal["hf", "null"]


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    """How to build a tokenizer: an HF tokenizer directory, or the null tokenizer for mock data."""

    tokenizer_type: TokenizerType = "hf"
    """``"hf"``: load ``path`` with ``transformers.AutoTokenizer``; ``"null"``: ids only, for mock data."""

    path: str | None = None
    """HF tokenizer directory (``save_pretrained`` output, e.g. a model checkpoint dir). Required for ``"hf"``."""

    vocab_size: int | None = None
    """Vocabulary size of the null tokenizer (its eod id is ``vocab_size - 1``). Required for ``"null"``."""

    eod_token: str | None = None
    """Token that ends a document (HF only). None: the tokenizer's eos token."""

    chat_template: str | None = None
    """Jinja chat template that replaces the tokenizer's own (HF only). None: keep the tokenizer's."""

    def __post_init__(self) -> None:
        if self.tokenizer_type not in ("hf", "null"):
            raise ValueError(f"tokenizer_type must be 'hf' or 'null', got {self.tokenizer_type!r}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"tokenizer vocab_size must be >= 2, got {self.vocab_size}")

    def finalize(self) -> None:
        """Check the fields that depend on each other; raise one ValueError listing every problem, or
        FileNotFoundError for an HF tokenizer directory that is not there."""
        problems = []
        if self.tokenizer_type == "hf" and not self.path:
            problems.append("tokenizer_type='hf' needs path (a local HF tokenizer directory)")
        if self.tokenizer_type == "hf" and self.vocab_size is not None:
            problems.append(f"tokenizer_type='hf' takes no vocab_size (the tokenizer's own is used), got "
                            f"{self.vocab_size}")
        if self.tokenizer_type == "null":
            if self.vocab_size is None:
                problems.append("tokenizer_type='null' needs vocab_size")
            if self.path is not None:
                problems.append(f"tokenizer_type='null' takes no path, got {self.path!r}")
            if self.eod_token is not None or self.chat_template is not None:
                problems.append("tokenizer_type='null' takes no eod_token or chat_template")
        if problems:
            raise ValueError("Invalid TokenizerConfig: " + "; ".join(problems))
        if self.tokenizer_type == "hf" and not os.path.isdir(self.path):  # before a model is built without it
            raise FileNotFoundError(
                f"Tokenizer directory {self.path!r} does not exist; point TokenizerConfig.path at a local HF "
                "tokenizer directory (the output of save_pretrained)"
            )


class Tokenizer(ABC):
    """The interface every bridge-data tokenizer offers."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids the tokenizer can produce (unpadded)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id appended after each document."""

    @property
    @abstractmethod
    def pad(self) -> int:
        """Id used to fill padded positions (always loss-masked)."""

    @property
    @abstractmethod
    def bos(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Encode ``text`` to ids, without adding special tokens."""

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts; the same ids as :meth:`tokenize` on each."""
        return [self.tokenize(text) for text in texts]

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        """Decode ``ids`` to text, keeping special tokens."""

    @property
    @abstractmethod
    def unique_identifiers(self) -> OrderedDict:
        """What identifies this tokenizer in megatron-core's dataset cache keys."""


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer behind the bridge-data interface.

    Args:
        hf_tokenizer: The loaded ``transformers`` tokenizer.
        name_or_path: Where it came from (used in cache keys and messages).
        eod_token: Token ending a document; None uses the tokenizer's eos token.

    Raises:
        ValueError: If no end-of-document token can be determined.
    """

    def __init__(self, hf_tokenizer: Any, *, name_or_path: str, eod_token: str | None = None) -> None:
        self.hf_tokenizer = hf_tokenizer
        """The underlying ``transformers`` tokenizer (chat template, offsets, batch encoding)."""
        self.name_or_path = name_or_path
        if eod_token is not None:
            eod = hf_tokenizer.convert_tokens_to_ids(eod_token)
            if eod is None or eod == hf_tokenizer.unk_token_id:
                raise ValueError(f"eod_token {eod_token!r} is not in the vocabulary of {name_or_path}")
        else:
            eod = hf_tokenizer.eos_token_id
            if eod is None:
                raise ValueError(
                    f"Tokenizer {name_or_path} has no eos token; set TokenizerConfig.eod_token to the token "
                    "that ends a document"
                )
        self._eod = int(eod)

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        """The tokenizer's pad id, or the eod id when it has none (padding is loss-masked either way)."""
        pad = self.hf_tokenizer.pad_token_id
        return self._eod if pad is None else int(pad)

    @property
    def bos(self) -> int | None:
        bos = self.hf_tokenizer.bos_token_id
        return None if bos is None else int(bos)

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's Jinja chat template, or None."""
        return getattr(self.hf_tokenizer, "chat_template", None)

    def tokenize(self, text: str) -> list[int]:
        return list(self.hf_tokenizer.encode(text, add_special_tokens=False))

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.hf_tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def detokenize(self, ids: list[int]) -> str:
        return self.hf_tokenizer.decode(list(ids))

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [("class", type(self).__qualname__), ("name_or_path", self.name_or_path),
             ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class NullTokenizer(Tokenizer):
    """Ids only, for mock data: ``vocab_size`` ids, eod (and pad) ``vocab_size - 1``, no bos.

    ``tokenize`` reads whitespace-separated integers and ``detokenize`` writes them, so text round-trips.

    Args:
        vocab_size: Number of ids.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"NullTokenizer vocab_size must be >= 2, got {vocab_size}")
        self._vocab_size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    @property
    def pad(self) -> int:
        return self._vocab_size - 1

    @property
    def bos(self) -> int | None:
        return None

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            try:
                value = int(word)
            except ValueError:
                raise ValueError(f"NullTokenizer reads whitespace-separated ids, got {word!r}") from None
            if not 0 <= value < self._vocab_size:
                raise ValueError(f"NullTokenizer id {value} is outside [0, {self._vocab_size})")
            ids.append(value)
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", type(self).__qualname__), ("vocab_size", self._vocab_size)])

    def __repr__(self) -> str:
        return f"NullTokenizer(vocab_size={self._vocab_size})"


# What save_pretrained writes for fast (tokenizer.json), SentencePiece (*.model), BPE (vocab.json + merges.txt),
# WordPiece (vocab.txt) and tiktoken tokenizers; tokenizer_config.json accompanies every one of them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _require_tokenizer_files(path: str) -> None:
    """Say which files were looked for, instead of the message of whichever tokenizer class transformers tries."""
    names = set(os.listdir(path))
    if names & set(TOKENIZER_FILES) or any(n.endswith((".tiktoken", ".model")) for n in names):
        return
    raise FileNotFoundError(
        f"Tokenizer directory {path!r} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}, "
        "*.model, *.tiktoken); point it at the output of tokenizer.save_pretrained(), e.g. the HF model "
        "directory the tokenizer came with"
    )


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """Build the tokenizer ``cfg`` describes.

    Args:
        cfg: The tokenizer config (finalized here).

    Returns:
        An :class:`HFTokenizer` or :class:`NullTokenizer`.

    Raises:
        ValueError: If the config is inconsistent or the tokenizer has no end-of-document token.
        FileNotFoundError: If ``path`` is not an existing directory (there is no hub access here) or holds no
            tokenizer files.
    """
    cfg.finalize()
    if cfg.tokenizer_type == "null":
        return NullTokenizer(cfg.vocab_size)
    _require_tokenizer_files(cfg.path)
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    if cfg.chat_template is not None:
        hf_tokenizer.chat_template = cfg.chat_template
    return HFTokenizer(hf_tokenizer, name_or_path=cfg.path, eod_token=cfg.eod_token)
