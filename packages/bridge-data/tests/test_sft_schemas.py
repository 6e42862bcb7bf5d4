import pytest

from bridge_data.sft_schemas import SCHEMAS, get_schema

CASES = [
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     [("user", "hi"), ("assistant", "yo")]),
    ("sharegpt", {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                                    {"from": "gpt", "value": "yo"}]},
     [("system", "s"), ("user", "hi"), ("assistant", "yo")]),
    ("prompt_completion", {"prompt": "2+2?", "completion": "4"}, [("user", "2+2?"), ("assistant", "4")]),
    ("alpaca", {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
     [("user", "Translate to French.\n\ncat"), ("assistant", "chat")]),
    ("alpaca", {"instruction": "Name a color.", "input": "", "output": "red"},
     [("user", "Name a color."), ("assistant", "red")]),
    ("squad", {"context": "Paris is in France.", "question": "Where is Paris?",
               "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}},
     [("user", "Context: Paris is in France.\nQuestion: Where is Paris?"), ("assistant", "France")]),
    ("gsm8k", {"question": "5+7?", "answer": "5+7=12\n#### 12"}, [("user", "5+7?"), ("assistant", "5+7=12\n#### 12")]),
]


@pytest.mark.parametrize(("name", "row", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_schema_turns_row_into_messages(name, row, expected):
    schema = get_schema("auto", row, "f.jsonl:1")
    assert schema.name == name
    assert get_schema(name, row, "f.jsonl:1") is schema
    assert [(m["role"], m["content"]) for m in schema.to_messages(row, "f.jsonl:1")] == expected


def test_auto_detection_names_row_keys_and_known_layouts():
    with pytest.raises(ValueError, match=r"f.jsonl:9: no SFT schema matches the row keys \['input'\].*gsm8k"):
        get_schema("auto", {"input": "x"}, "f.jsonl:9")


def test_unknown_schema_name_is_rejected():
    with pytest.raises(ValueError, match="Unknown SFT schema 'oasst'"):
        get_schema("oasst", {}, "f.jsonl:1")


@pytest.mark.parametrize(
    ("name", "row", "message"),
    [
        ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\] has from='bot'"),
        ("messages", {"messages": [{"role": "user"}]}, r"messages\[0\]: no key 'content'"),
        ("messages", {"messages": "hi"}, "key 'messages' holds str, expected list"),
        ("squad", {"context": "c", "question": "q", "answers": {"text": []}}, "non-empty list"),
        ("gsm8k", {"question": "q"}, "no key 'answer'"),
        ("alpaca", {"instruction": "i", "input": 3, "output": "o"}, "key 'input' holds int, expected str or NoneType"),
    ],
    ids=["sharegpt-role", "message-content", "messages-type", "squad-answers", "gsm8k-answer", "alpaca-input"],
)
def test_malformed_rows_name_row_and_key(name, row, message):
    with pytest.raises(ValueError, match="f.jsonl:4"):
        SCHEMAS[name].to_messages(row, "f.jsonl:4")
    with pytest.raises(ValueError, match=message):
        SCHEMAS[name].to_messages(row, "f.jsonl:4")
