import logging

import numpy as np
import pytest
import torch

from bridge_data.sft import ResampledDataset, SFTDataConfig
from bridge_data.tokenizers import NullTokenizer

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is the capital of france?"},
    {"role": "assistant", "content": "paris."},
    {"role": "user", "content": "and seven plus five?"},
    {"role": "assistant", "content": "twelve!"},
]


def masked_spans(sample, tokenizer):
    """Decoded runs of labels where the loss mask is 1."""
    spans, current = [], []
    for label, m in zip(sample["labels"].tolist(), sample["loss_mask"].tolist()):
        if m:
            current.append(label)
        elif current:
            spans.append(tokenizer.detokenize(current))
            current = []
    if current:
        spans.append(tokenizer.detokenize(current))
    return spans


def _real_length(sample):
    """Length of the sequence before padding: the last target position + 2."""
    return int(torch.nonzero(sample["loss_mask"]).max()) + 2


def test_chat_loss_mask_covers_exactly_the_assistant_turns(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    [sample] = SFTDataConfig(path=path, seq_length=96).build(tokenizer)[0]
    assert masked_spans(sample, tokenizer) == ["paris.<|end|>\n", "twelve!<|end|>\n"]
    rendered = tokenizer.hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    n = _real_length(sample)
    assert tokenizer.detokenize(sample["tokens"][:n].tolist()) == rendered
    assert torch.equal(sample["labels"][: n - 1], sample["tokens"][1:n])
    assert sample["tokens"][n:].eq(tokenizer.pad).all() and not sample["loss_mask"][n - 1 :].any()
    assert sample["position_ids"].tolist() == list(range(96))


def test_every_schema_masks_only_the_answer(tokenizer, tmp_path, write_jsonl):
    rows = [{"prompt": "2+2?", "completion": "four"},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello world"}]},
            {"context": "paris is in france.", "question": "where is paris?", "answers": {"text": ["france"]}},
            {"question": "five plus seven?", "answer": "twelve"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    train, _, _ = SFTDataConfig(path=path, seq_length=64).build(tokenizer)
    assert [masked_spans(train[i], tokenizer) for i in range(4)] == [
        ["four<|end|>\n"], ["hello world<|end|>\n"], ["france<|end|>\n"], ["twelve<|end|>\n"]]


def test_plain_mode_masks_completion_and_eod(plain_tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "what is the answer?", "completion": "twelve"}])
    [sample] = SFTDataConfig(path=path, seq_length=32, use_chat_template=False).build(plain_tokenizer)[0]
    n = _real_length(sample)
    assert plain_tokenizer.detokenize(sample["tokens"][:n].tolist()) == (
        "<|begin_of_text|>what is the answer?\ntwelve<|end_of_text|>")
    assert masked_spans(sample, plain_tokenizer) == ["twelve<|end_of_text|>"]


def test_answer_only_loss_off_trains_every_token(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    [sample] = SFTDataConfig(path=path, seq_length=96, answer_only_loss=False).build(tokenizer)[0]
    n = _real_length(sample)
    assert sample["loss_mask"][: n - 1].eq(1).all() and n == len(tokenizer.tokenize(
        tokenizer.hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)))


def _long_rows(n_long):
    short = {"prompt": "hi", "completion": "hello"}
    long = {"prompt": "the quick brown fox", "completion": "jumps over the lazy dog " * 10}
    return [short] * 3 + [long] * n_long


def test_truncation_policies(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "long.jsonl", _long_rows(2))
    truncated, _, _ = SFTDataConfig(path=path, seq_length=48, truncation="truncate").build(tokenizer)
    assert len(truncated) == 5 and all(truncated[i]["tokens"].shape == (48,) for i in range(5))
    assert truncated[4]["loss_mask"][-1] == 0 and truncated[4]["loss_mask"].sum() > 0
    dropped, _, _ = SFTDataConfig(path=path, seq_length=48, truncation="drop").build(tokenizer)
    assert len(dropped) == 3
    with pytest.raises(ValueError, match=r"long.jsonl:4: \d+ tokens, more than seq_length=48"):
        SFTDataConfig(path=path, seq_length=48, truncation="fail").build(tokenizer)


def test_all_rows_dropped_is_an_error(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "long.jsonl", _long_rows(2)[3:])
    with pytest.raises(ValueError, match="No usable train rows of .*long.jsonl"):
        SFTDataConfig(path=path, seq_length=48, truncation="drop").build(tokenizer)


def test_no_usable_rows_says_why(tokenizer, tmp_path, write_jsonl):
    long_prompt = [{"messages": [{"role": "user", "content": "the quick brown fox " * 20},
                                 {"role": "assistant", "content": "paris."}]}] * 3
    path = write_jsonl(tmp_path / "long.jsonl", long_prompt)
    with pytest.raises(ValueError, match=r"long.jsonl: of 3 rows, 3 lose their whole answer when cut to "
                                         r"seq_length=16 \(the prompt fills it\); raise seq_length$"):
        SFTDataConfig(path=path, seq_length=16).build(tokenizer)
    with pytest.raises(ValueError, match=r"of 3 rows, 3 are longer than seq_length=16 \(truncation='drop' skips "
                                         r"them\); raise seq_length$"):
        SFTDataConfig(path=path, seq_length=16, truncation="drop").build(tokenizer)


def test_pad_to_multiple_without_seq_length_padding(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "hi", "completion": "x" * n} for n in (1, 9, 20)])
    train, _, _ = SFTDataConfig(path=path, seq_length=64, pad_to_seq_length=False, pad_to_multiple_of=8).build(
        tokenizer)
    lengths = [train[i]["tokens"].shape[0] for i in range(3)]
    assert all(n % 8 == 0 for n in lengths) and len(set(lengths)) > 1
    assert all(_real_length(train[i]) <= lengths[i] < _real_length(train[i]) + 8 for i in range(3))


# Renders the last assistant turn with an empty think block and earlier ones without, as Qwen3's template does:
# not prefix-stable at the earlier turns.
LAST_TURN_DIFFERS = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Puts the system prompt into the last user turn, as Mistral's template does: the prompt before an earlier answer
# differs from the full rendering's.
SYSTEM_IN_LAST_USER_TURN = (
    "{{ bos_token }}{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}[INST] "
    "{% if system and m is sameas users[-1] %}{{ system }}\n\n{% endif %}{{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
)
# Rewrites earlier turns (a summary replaces their content): no way to locate them.
REWRITES_HISTORY = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' and not loop.last %}(earlier answer)"
    "{% else %}{{ m['content'] }}{% endif %}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
    "{% endif %}"
)


def test_templates_that_render_by_where_the_conversation_ends_mask_every_turn(save_tokenizer, tmp_path, write_jsonl):
    from bridge_data import TokenizerConfig, build_tokenizer

    tokenizer = build_tokenizer(TokenizerConfig(path=save_tokenizer(tmp_path / "tok", chat_template=LAST_TURN_DIFFERS)))
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    [sample] = SFTDataConfig(path=path, seq_length=96).build(tokenizer)[0]
    # by hand: the earlier answer as the full rendering has it, the last one with its think block
    assert masked_spans(sample, tokenizer) == ["paris.<|end|>\n", "<think>\n\n</think>\n\ntwelve!<|end|>\n"]
    n = _real_length(sample)
    assert tokenizer.detokenize(sample["tokens"][:n].tolist()) == tokenizer.hf_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False)
    mistral_like = build_tokenizer(TokenizerConfig(path=str(tmp_path / "tok"), chat_template=SYSTEM_IN_LAST_USER_TURN))
    [sample] = SFTDataConfig(path=path, seq_length=96).build(mistral_like)[0]
    assert masked_spans(sample, mistral_like) == ["paris.<|end|>", "twelve!<|end|>"]
    assert mistral_like.hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|begin_of_text|>[INST] what is the capital of france? [/INST]paris.<|end|>[INST] be brief\n\nand seven plus "
        "five? [/INST]twelve!<|end|>")
    rewriting = build_tokenizer(TokenizerConfig(path=str(tmp_path / "tok"), chat_template=REWRITES_HISTORY))
    with pytest.raises(ValueError, match=r"chat.jsonl:1: .* prefix-stably at message 2.*TokenizerConfig.chat_template"):
        SFTDataConfig(path=path, seq_length=96).build(rewriting)


# The same renderings with HF's {% generation %} markers around what the model must produce, so that
# transformers' return_assistant_tokens_mask is the oracle for the mask (the markers render nothing otherwise).
# Qwen3-like: the last assistant turn gets an empty think block. Mistral-like: the system prompt goes into the last
# user turn, a space before each answer and the answer trimmed (Mistral v0.3's template).
ORACLE_TEMPLATES = {
    "last_turn_differs": (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}"
        "{% generation %}{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|end|>\n"
        "{% endgeneration %}{% else %}{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    "system_in_last_user_turn": (
        "{{ bos_token }}{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
        "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
        "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}[INST] "
        "{% if system and m is sameas users[-1] %}{{ system }}\n\n{% endif %}{{ m['content'] }}[/INST]"
        "{% else %}{% generation %} {{ m['content'] | trim }}<|end|>{% endgeneration %}{% endif %}{% endfor %}"),
}
ORACLE_CONVERSATIONS = {
    "system": CONVERSATION,
    "short_and_empty_answers": [{"role": "user", "content": "what is the answer?"},
                                {"role": "assistant", "content": "a"},
                                {"role": "user", "content": "the question?"}, {"role": "assistant", "content": ""},
                                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "is"}],
    "consecutive_answers": [{"role": "user", "content": "the question?"}, {"role": "assistant", "content": "hello"},
                            {"role": "assistant", "content": "world"}],
    "opens_with_assistant": [{"role": "assistant", "content": "hello world"}, {"role": "user", "content": "capital?"},
                             {"role": "assistant", "content": "paris."}],
    "untrimmed_answers": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                          {"role": "assistant", "content": " paris  "}, {"role": "user", "content": "world"},
                          {"role": "assistant", "content": "twelve "}],
}


@pytest.mark.parametrize("sentencepiece", [False, True], ids=["byte_level", "sentencepiece"])
@pytest.mark.parametrize(("template", "conversation"), [
    # an opening assistant message has no generation prompt before it: whether the Mistral-like template's space
    # before it belongs to the answer is not defined (transformers' mask says what the markers say)
    (t, c) for t in sorted(ORACLE_TEMPLATES) for c in sorted(ORACLE_CONVERSATIONS)
    if (t, c) != ("system_in_last_user_turn", "opens_with_assistant")])
def test_assistant_mask_matches_transformers_generation_mask(template, conversation, sentencepiece, tmp_path):
    """The mask equals transformers' return_assistant_tokens_mask on the same template with {% generation %}
    markers, for templates that are not prefix-stable. Before: the first token of each answer was dropped under a
    SentencePiece tokenizer (``▁paris`` starts at the space), and short, empty or trimmed answers and an opening
    assistant message were refused."""
    from bridge_data import TokenizerConfig, build_tokenizer
    from bridge_data.sft_tokenize import tokenize_chat
    from bridge_data.testing import save_tiny_tokenizer

    path = save_tiny_tokenizer(tmp_path / "tok", chat_template=ORACLE_TEMPLATES[template],
                               sentencepiece=sentencepiece)
    tokenizer = build_tokenizer(TokenizerConfig(path=path))
    messages = ORACLE_CONVERSATIONS[conversation]
    ids, mask = tokenize_chat(tokenizer, messages, where="row")
    oracle = tokenizer.hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                        return_assistant_tokens_mask=True)
    assert ids.tolist() == list(oracle["input_ids"])
    assert mask.astype(int).tolist() == list(oracle["assistant_masks"])
    assert mask.sum() >= 2 * sum(m["role"] == "assistant" for m in messages)  # every turn has answer tokens


def test_chat_data_without_template_names_tokenizer_and_file(plain_tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match=r"plain-tokenizer.*has no chat template.*chat.jsonl") as err:
        SFTDataConfig(path=path, seq_length=64).build(plain_tokenizer)
    # the spellings of a bridge-train config / bridge-run override too
    assert "tokenizer.chat_template" in str(err.value) and "dataset.use_chat_template=false" in str(err.value)


def test_multi_turn_rows_need_a_chat_template(plain_tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match=r"chat.jsonl:1: without a chat template"):
        SFTDataConfig(path=path, seq_length=64, use_chat_template=False).build(plain_tokenizer)


def test_conversation_without_assistant_is_rejected(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"chat.jsonl:1: the conversation has no assistant message"):
        SFTDataConfig(path=path, seq_length=64).build(tokenizer)


def test_missing_data_files_are_named_at_finalize(tmp_path, write_jsonl):
    """finalize() (the training config check, before a model is built) names every missing data file."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": "b"}])
    SFTDataConfig(path=path, seq_length=32).finalize()
    with pytest.raises(FileNotFoundError, match=r"SFT data path '.*absent.jsonl', valid_path '.*gone.jsonl' does "
                                                r"not exist"):
        SFTDataConfig(path=str(tmp_path / "absent.jsonl"), valid_path=str(tmp_path / "gone.jsonl"),
                      seq_length=32).finalize()


def test_null_tokenizer_is_rejected(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match="needs an HF tokenizer"):
        SFTDataConfig(path=path, seq_length=64).build(NullTokenizer(10))


def test_missing_and_empty_files_are_reported(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        SFTDataConfig(path=str(tmp_path / "absent.jsonl"), seq_length=64).build(tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl.*no rows"):
        SFTDataConfig(path=str(tmp_path / "empty.jsonl"), seq_length=64).build(tokenizer)


def test_reads_hf_datasets_dict_and_parquet(tokenizer, tmp_path, write_jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = [{"question": f"{i} plus {i}?", "answer": f"{2 * i}"} for i in range(6)]
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(
        str(tmp_path / "hf"))
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
    ref, _, _ = SFTDataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), seq_length=32).build(tokenizer)
    hf_train, _, hf_test = SFTDataConfig(path=str(tmp_path / "hf"), test_path=str(tmp_path / "hf"),
                                         seq_length=32).build(tokenizer)
    parquet, _, _ = SFTDataConfig(path=str(tmp_path / "d.parquet"), seq_length=32).build(tokenizer)
    for i in range(6):
        assert torch.equal(hf_train[i]["tokens"], ref[i]["tokens"])
        assert torch.equal(parquet[i]["tokens"], ref[i]["tokens"])
    assert len(hf_test) == 6  # the same directory's "train" split; hf_split picks another one
    _, _, only_test = SFTDataConfig(path=str(tmp_path / "hf"), test_path=str(tmp_path / "hf"), seq_length=32,
                                    hf_split="test").build(tokenizer)
    assert len(only_test) == 2
    with pytest.raises(ValueError, match=r"hf_split 'test' picks a split of an HF DatasetDict directory"):
        SFTDataConfig(path=str(tmp_path / "d.parquet"), seq_length=32, hf_split="test").build(tokenizer)


def test_split_carves_disjoint_valid_and_test_sets(tokenizer, tmp_path, write_jsonl):
    rows = [{"prompt": f"row {i}", "completion": "ok"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, valid, test = SFTDataConfig(path=path, seq_length=32, split="80,10,10").build(tokenizer)
    assert (len(train), len(valid), len(test)) == (16, 2, 2)
    seen = [tuple(d[i]["tokens"].tolist()) for d in (train, valid, test) for i in range(len(d))]
    assert len(set(seen)) == 20


def test_sample_counts_resample_shuffled_epochs(tokenizer, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"row {i}", "completion": "ok"} for i in range(5)])
    train, valid, test = SFTDataConfig(path=path, seq_length=32).build(tokenizer, train_samples=12, valid_samples=3)
    assert isinstance(train, ResampledDataset) and len(train) == 12 and valid is None and test is None
    base = train.dataset
    ids = [next(j for j in range(5) if torch.equal(train[i]["tokens"], base[j]["tokens"])) for i in range(12)]
    assert sorted(ids[:5]) == sorted(ids[5:10]) == list(range(5))
    assert ids[:5] != ids[5:10]
    with pytest.raises(IndexError):
        train[12]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"split": "1,1,1", "valid_path": "v.jsonl"}, "do not also set"), ({"split": "1,x"}, "split must be"),
     ({"pad_to_multiple_of": 5}, "multiple of pad_to_multiple_of"),
     # a row cut to seq_length would be padded past it (to 65 here): refused without seq-length padding too
     ({"pad_to_multiple_of": 5, "pad_to_seq_length": False}, "multiple of pad_to_multiple_of"),
     # options that nothing would read
     ({"packed": True, "pad_to_seq_length": False}, "pad_to_seq_length=False applies to unpacked samples"),
     ({"separator": " ### "}, r"separator=' ### ' applies without a chat template"),
     ({"add_bos": False}, "add_bos=False applies without a chat template")],
    ids=["split-and-valid-path", "bad-split", "seq-not-multiple", "seq-not-multiple-unpadded", "packed-unpadded",
         "separator-with-template", "add-bos-with-template"],
)
def test_finalize_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SFTDataConfig(path="d.jsonl", seq_length=64, **kwargs).finalize()


def test_fields_assigned_after_construction_are_checked_at_finalize():
    """Overrides assign fields after __init__: finalize() checks them again (pad_to_multiple_of=0 raised
    ZeroDivisionError there)."""
    cfg = SFTDataConfig(path="d.jsonl", seq_length=64)
    cfg.pad_to_multiple_of, cfg.truncation = 0, "cut"
    with pytest.raises(ValueError, match=r"truncation must be .*; pad_to_multiple_of must be >= 1, got 0"):
        cfg.finalize()


@pytest.mark.parametrize(("kwargs", "message"), [({"truncation": "cut"}, "truncation"),
                                                 ({"seq_length": 1}, "seq_length")], ids=["truncation", "seq"])
def test_config_rejects_bad_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SFTDataConfig(**({"path": "d.jsonl", "seq_length": 64} | kwargs))


def test_rows_truncated_before_the_answer_are_skipped(tokenizer, tmp_path, write_jsonl, caplog):
    rows = [{"prompt": "the quick brown fox " * 10, "completion": "yes"}, {"prompt": "hi", "completion": "yo"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="bridge_data.sft"):
        train, _, _ = SFTDataConfig(path=path, seq_length=16).build(tokenizer)
    assert len(train) == 1 and "1 rows cut to seq_length before their answer" in caplog.text
    assert np.isclose(float(train[0]["loss_mask"].sum()), len(tokenizer.tokenize("yo")) + 2)


def test_pathlib_paths_are_accepted(tokenizer, tmp_path, write_jsonl):
    """SFTDataConfig's path is typed os.PathLike, yet build() (and preprocess) failed with 'PosixPath' object has
    no attribute 'lower'."""
    from pathlib import Path

    from bridge_data.preprocessing import PreprocessConfig, preprocess
    from bridge_data.tokenizers import TokenizerConfig

    path = Path(write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "2+2?", "completion": "four"}]))
    [sample] = SFTDataConfig(path=path, seq_length=64).build(tokenizer)[0]
    [again] = SFTDataConfig(path=str(path), seq_length=64).build(tokenizer)[0]
    assert all(torch.equal(sample[k], again[k]) for k in sample)
    ids = Path(write_jsonl(tmp_path / "ids.jsonl", [{"text": "1 2 3"}]))
    [result] = preprocess(PreprocessConfig(inputs=[ids], output_prefix=tmp_path / "c", progress=False,
                                           tokenizer=TokenizerConfig(tokenizer_type="null", vocab_size=10)))
    assert result.prefix == str(tmp_path / "c") and (result.num_documents, result.num_tokens) == (1, 4)
