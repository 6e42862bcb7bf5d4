"""Test harness for bridge-data and the packages built on it: an offline tokenizer and generated text.

Nothing is downloaded: :func:`save_tiny_tokenizer` trains a small byte-level BPE with the ``tokenizers`` library
and saves it as an HF tokenizer directory with a chat template.
"""

from __future__ import annotations

import json
import random

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_texts", "save_tiny_tokenizer", "write_jsonl"]

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "what", "is", "answer", "question",
         "context", "paris", "capital", "france", "seven", "plus", "five", "equals", "twelve", "hello", "world",
         "model", "data", "token", "train", "loss"]


def make_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 20) -> list[str]:
    """``n`` deterministic sentences of random words (with some punctuation and digits)."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        texts.append(" ".join(words) + rng.choice([".", "?", "!", f" {i}."]))
    return texts


def write_jsonl(path, rows: list[dict]) -> str:
    """Write ``rows`` as JSON lines to ``path``; return the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def save_tiny_tokenizer(path, *, chat_template: str | None = CHAT_TEMPLATE, pad: bool = True,
                        vocab_size: int = 320, sentencepiece: bool = False) -> str:
    """Train a BPE of ``vocab_size`` ids on generated text and save it as an HF tokenizer directory.

    Byte-level (GPT-2 / Llama 3 / Qwen style) by default; ``sentencepiece``: a Metaspace BPE as in Llama 2 and
    Mistral's tokenizers, whose word tokens begin with the space before the word (``▁paris``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if sentencepiece:
        bpe = Tokenizer(models.BPE(byte_fallback=True))
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = []
    else:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=alphabet)
    bpe.train_from_iterator(make_texts(400, seed=1), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                 pad_token="<|pad|>" if pad else None)
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(str(path))
    return str(path)
