"""Schema adapters: common SFT row layouts turned into chat messages (``[{"role": ..., "content": ...}]``).

| schema | row keys | messages |
|---|---|---|
| ``messages`` | ``messages``: list of ``{role, content}`` | as given |
| ``sharegpt`` | ``conversations``: list of ``{from, value}`` | ``from`` mapped: human -> user, gpt -> assistant |
| ``prompt_completion`` | ``prompt``, ``completion`` | user: prompt; assistant: completion |
| ``alpaca`` | ``instruction``, ``output`` (``input`` optional) | user: instruction, a blank line, input; assistant: output |
| ``squad`` | ``context``, ``question``, ``answers`` (``{"text": [...]}``) | user: context + question; assistant: 1st answer |
| ``gsm8k`` | ``question``, ``answer`` | user: question; assistant: answer |

``"auto"`` picks the first schema of this table whose keys the row has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bridge_data.sources import get_field

SchemaName = Literal["auto", "messages", "sharegpt", "prompt_completion", "alpaca", "squad", "gsm8k"]
Messages = list[dict[str, str]]

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "model": "assistant", "tool": "tool", "function": "tool",
                   "observation": "tool"}


@dataclass(frozen=True, slots=True)
class Schema:
    """One row layout: the keys that identify it and the function turning a row into messages."""

    name: str
    """Name used in ``SFTDataConfig.schema``."""

    keys: tuple[str, ...]
    """Keys a row of this layout has."""

    to_messages: Callable[[dict, str], Messages]
    """``(row, where) -> messages``; raises ValueError naming ``where`` on malformed rows."""

    is_chat: bool
    """Whether rows may hold whole conversations (these need a chat template)."""


def _messages(row: dict, where: str) -> Messages:
    messages = get_field(row, "messages", where, kind=list)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: messages[{i}] is {type(message).__name__}, expected a dict")
        role = get_field(message, "role", f"{where} messages[{i}]")
        content = get_field(message, "content", f"{where} messages[{i}]")
        out.append({"role": role, "content": content})
    return out


def _sharegpt(row: dict, where: str) -> Messages:
    turns = get_field(row, "conversations", where, kind=list)
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: conversations[{i}] is {type(turn).__name__}, expected a dict")
        speaker = get_field(turn, "from", f"{where} conversations[{i}]")
        if speaker not in _SHAREGPT_ROLES:
            raise ValueError(f"{where}: conversations[{i}] has from={speaker!r}; known: {sorted(_SHAREGPT_ROLES)}")
        out.append({"role": _SHAREGPT_ROLES[speaker], "content": get_field(turn, "value", f"{where} conversations[{i}]")})
    return out


def _prompt_completion(row: dict, where: str) -> Messages:
    return [{"role": "user", "content": get_field(row, "prompt", where)},
            {"role": "assistant", "content": get_field(row, "completion", where)}]


def _alpaca(row: dict, where: str) -> Messages:
    instruction = get_field(row, "instruction", where)
    extra = get_field(row, "input", where, kind=(str, type(None))) if "input" in row else None
    return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
            {"role": "assistant", "content": get_field(row, "output", where)}]


def _squad(row: dict, where: str) -> Messages:
    context = get_field(row, "context", where)
    question = get_field(row, "question", where)
    answers = get_field(row, "answers", where, kind=dict)
    texts = answers.get("text")
    if not isinstance(texts, list) or not texts or not isinstance(texts[0], str):
        raise ValueError(f"{where}: answers['text'] must be a non-empty list of strings, got {texts!r}")
    return [{"role": "user", "content": f"Context: {context}\nQuestion: {question}"},
            {"role": "assistant", "content": texts[0]}]


def _gsm8k(row: dict, where: str) -> Messages:
    return [{"role": "user", "content": get_field(row, "question", where)},
            {"role": "assistant", "content": get_field(row, "answer", where)}]


SCHEMAS: dict[str, Schema] = {s.name: s for s in (
    Schema(name="messages", keys=("messages",), to_messages=_messages, is_chat=True),
    Schema(name="sharegpt", keys=("conversations",), to_messages=_sharegpt, is_chat=True),
    Schema(name="prompt_completion", keys=("prompt", "completion"), to_messages=_prompt_completion, is_chat=False),
    Schema(name="alpaca", keys=("instruction", "output"), to_messages=_alpaca, is_chat=False),
    Schema(name="squad", keys=("context", "question", "answers"), to_messages=_squad, is_chat=False),
    Schema(name="gsm8k", keys=("question", "answer"), to_messages=_gsm8k, is_chat=False),
)}
"""Every known row layout, in ``"auto"`` detection order."""


def get_schema(name: str, row: dict, where: str) -> Schema:
    """The schema called ``name``, or for ``"auto"`` the first one whose keys ``row`` has.

    Raises:
        ValueError: If ``name`` is unknown or no schema matches the row (naming ``where`` and its keys).
    """
    if name != "auto":
        if name not in SCHEMAS:
            raise ValueError(f"Unknown SFT schema {name!r}; choose 'auto' or one of {sorted(SCHEMAS)}")
        return SCHEMAS[name]
    for schema in SCHEMAS.values():
        if all(k in row for k in schema.keys):
            return schema
    layouts = "; ".join(f"{s.name}: {list(s.keys)}" for s in SCHEMAS.values())
    raise ValueError(f"{where}: no SFT schema matches the row keys {sorted(row)}. Known layouts: {layouts}")
