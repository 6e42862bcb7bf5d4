import pytest

from bridge_data.tokenizers import HFTokenizer, NullTokenizer, TokenizerConfig, build_tokenizer


def test_hf_tokenizer_exposes_raw_vocab_and_special_ids(tokenizer):
    hf = tokenizer.hf_tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.vocab_size == len(hf) == 320
    assert tokenizer.eod == hf.convert_tokens_to_ids("<|end_of_text|>")
    assert tokenizer.pad == hf.convert_tokens_to_ids("<|pad|>")
    assert tokenizer.bos == hf.convert_tokens_to_ids("<|begin_of_text|>")
    assert len({tokenizer.eod, tokenizer.pad, tokenizer.bos}) == 3


def test_hf_tokenize_adds_no_special_tokens_and_roundtrips(tokenizer):
    text = "the quick brown fox? 42."
    ids = tokenizer.tokenize(text)
    assert ids == tokenizer.hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.bos not in ids
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.tokenize_batch([text, "hello"]) == [ids, tokenizer.tokenize("hello")]


def test_hf_tokenizer_keeps_chat_template(tokenizer):
    assert "<|assistant|>" in tokenizer.chat_template


def test_hf_pad_falls_back_to_eod_without_pad_token(plain_tokenizer):
    assert plain_tokenizer.hf_tokenizer.pad_token_id is None
    assert plain_tokenizer.pad == plain_tokenizer.eod
    assert plain_tokenizer.chat_template is None


def test_eod_token_override_picks_that_token(tokenizer_dir):
    tok = build_tokenizer(TokenizerConfig(path=tokenizer_dir, eod_token="<|end|>"))
    assert tok.eod == tok.hf_tokenizer.convert_tokens_to_ids("<|end|>")


def test_eod_token_override_rejects_unknown_token(tokenizer_dir):
    with pytest.raises(ValueError, match="not-a-token"):
        build_tokenizer(TokenizerConfig(path=tokenizer_dir, eod_token="not-a-token"))


def test_chat_template_override_replaces_template(tokenizer_dir):
    tok = build_tokenizer(TokenizerConfig(path=tokenizer_dir, chat_template="{{ messages[0]['content'] }}"))
    assert tok.hf_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_null_tokenizer_uses_last_id_as_eod_and_pad():
    tok = build_tokenizer(TokenizerConfig(tokenizer_type="null", vocab_size=100))
    assert isinstance(tok, NullTokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos) == (100, 99, 99, None)
    assert tok.tokenize("1 2  30\n4") == [1, 2, 30, 4]
    assert tok.detokenize([1, 2, 30]) == "1 2 30"


@pytest.mark.parametrize("text", ["1 100", "-1", "1 x"], ids=["too-large", "negative", "not-an-int"])
def test_null_tokenizer_rejects_invalid_ids(text):
    with pytest.raises(ValueError, match="NullTokenizer"):
        NullTokenizer(100).tokenize(text)


def test_build_tokenizer_missing_directory_names_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        build_tokenizer(TokenizerConfig(path=missing))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokenizer_type": "hf"}, "needs path"),
        ({"tokenizer_type": "null"}, "needs vocab_size"),
        ({"tokenizer_type": "null", "vocab_size": 10, "path": "/x"}, "takes no path"),
        ({"tokenizer_type": "hf", "path": "/x", "vocab_size": 10}, "takes no vocab_size"),  # (it was ignored)
    ],
    ids=["hf-without-path", "null-without-vocab", "null-with-path", "hf-with-vocab"],
)
def test_finalize_rejects_inconsistent_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tokenizer(TokenizerConfig(**kwargs))


@pytest.mark.parametrize(("kwargs", "message"), [({"tokenizer_type": "sp"}, "tokenizer_type"),
                                                 ({"vocab_size": 1}, "vocab_size")], ids=["type", "vocab"])
def test_config_rejects_bad_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenizerConfig(**kwargs)


def test_config_rejects_typo_attribute():
    cfg = TokenizerConfig(path="x")
    with pytest.raises(AttributeError):
        cfg.vocab_sise = 3


def test_directory_without_tokenizer_files_says_which_files_were_looked_for(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # a model dir saved without its tokenizer
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files") as info:
        build_tokenizer(TokenizerConfig(path=str(tmp_path)))
    assert str(tmp_path) in str(info.value) and "tokenizer.json" in str(info.value)
    assert "requires the SentencePiece library" not in str(info.value)  # transformers' message
