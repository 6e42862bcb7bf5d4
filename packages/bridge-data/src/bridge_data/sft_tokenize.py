"""Turn one SFT example (chat messages) into token ids plus a mask of the tokens to learn.

Chat mode renders the tokenizer's chat template. The assistant tokens are found by rendering the conversation
up to each assistant message twice, once ending in the generation prompt and once including the message: the
characters in between are what the model must produce (the answer and the template's end-of-turn marker).
The full text is tokenized once, and tokens starting inside those character spans are the targets. This works
with any template that renders conversations prefix-stably, with no ``{% generation %}`` markers needed.

Templates that render a conversation differently depending on where it ends (Qwen3's adds an empty
``<think></think>`` block to the last assistant turn; Mistral's puts the system prompt into the last user turn)
are not prefix-stable at the earlier turns. There the turn is found in the full text instead: the message
contents located in order, the turn being its content plus the end-of-turn text the template puts after it.
"""

from __future__ import annotations

import numpy as np

from bridge_data.sft_schemas import Messages
from bridge_data.tokenizers import HFTokenizer


def tokenize_chat(tokenizer: HFTokenizer, messages: Messages, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``messages`` rendered with the chat template, and which ids belong to assistant turns.

    Args:
        tokenizer: An HF tokenizer with a chat template.
        messages: ``[{"role": ..., "content": ...}, ...]`` with at least one assistant message.
        where: File and row, for error messages.

    Returns:
        ``(ids, assistant_mask)``: int64 [L] and bool [L].

    Raises:
        ValueError: If there is no assistant message, the template fails to render, or the template is not
            prefix-stable (so the assistant tokens cannot be located).
    """
    hf = tokenizer.hf_tokenizer

    def render(msgs: Messages, generation_prompt: bool) -> str:
        try:
            return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:
            raise ValueError(f"{where}: the chat template of {tokenizer.name_or_path} failed: {err}") from err

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(messages[:i], True)
        end = render(messages[: i + 1], False)
        if full.startswith(start) and full.startswith(end) and len(start) <= len(end):
            span = (len(start), len(end))
        else:
            span = _turn_in_full_text(full, end, messages, i)
        if span is None or (spans and span[0] < spans[-1][1]):
            raise ValueError(
                f"{where}: the chat template of {tokenizer.name_or_path} does not render this conversation "
                f"prefix-stably at message {i}, so its assistant tokens cannot be located; set a training template "
                "that renders each assistant turn the same way wherever it is (TokenizerConfig.chat_template, "
                "tokenizer.chat_template=... in overrides), or answer_only_loss=False"
            )
        spans.append(span)
    if not spans:
        raise ValueError(f"{where}: the conversation has no assistant message, so there is nothing to learn")
    encoded = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in encoded["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    return ids, mask


def _turn_in_full_text(full: str, last: str, messages: Messages, i: int) -> tuple[int, int] | None:
    """Character span in ``full`` of assistant message ``i``, for templates that render a conversation differently
    depending on where it ends (Qwen3's think block on the last assistant turn; Mistral's system prompt inside the
    last user turn).

    The contents of the messages up to ``i`` (system prompts aside, which templates move) are located in order in
    ``full`` and in ``last`` (the conversation rendered up to and with message ``i``); the turn is the content
    followed by the end-of-turn text that ``last`` puts after it. None when that does not locate it unambiguously:
    a content the template rewrote, more template text before the content than ``last`` has there, or a
    different end of turn.
    """
    located_full, located_last = _locate(full, messages[: i + 1]), _locate(last, messages[: i + 1])
    if located_full is None or located_last is None:
        return None

    def gap(located):  # template text between the previous message's content and this one's
        return located[-1][0] - (located[-2][1] if len(located) > 1 else 0)

    if gap(located_full) > gap(located_last):
        return None
    end_of_turn = last[located_last[-1][1]:]
    at, stop = located_full[-1]
    if not full.startswith(end_of_turn, stop):
        return None
    return at, stop + len(end_of_turn)


def _locate(text: str, messages: Messages) -> list[tuple[int, int]] | None:
    """``(start, end)`` of each non-system message's content in ``text``, searched in order; None if one is missing
    or empty."""
    located, pos = [], 0
    for message in messages:
        content = message.get("content")
        if message["role"] == "system":
            continue
        if not isinstance(content, str) or not content or (at := text.find(content, pos)) < 0:
            return None
        located.append((at, at + len(content)))
        pos = at + len(content)
    return located


def tokenize_plain(tokenizer: HFTokenizer, messages: Messages, *, separator: str, add_bos: bool,
                   where: str) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``[bos] prompt separator completion eod`` without a chat template; the completion and eod are targets.

    ``messages`` must be a single exchange: an optional system message, one user message, one assistant
    message. The system text, if any, goes before the prompt, joined by ``separator``.

    Raises:
        ValueError: If ``messages`` is not a single exchange (such data needs a chat template).
    """
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(f"{where}: without a chat template a row must be one user and one assistant message "
                         f"(optionally after a system message), got roles {roles}; set use_chat_template=True")
    prompt = separator.join(m["content"] for m in messages[:-1]) + separator
    prefix = [tokenizer.bos] if add_bos and tokenizer.bos is not None else []
    prompt_ids = prefix + tokenizer.tokenize(prompt)
    completion_ids = tokenizer.tokenize(messages[-1]["content"]) + [tokenizer.eod]
    ids = np.asarray(prompt_ids + completion_ids, dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prompt_ids):] = True
    return ids, mask
