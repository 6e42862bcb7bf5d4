"""Turn one SFT example (chat messages) into token ids plus a mask of the tokens to learn.

Chat mode renders the tokenizer's chat template. The assistant tokens are found by rendering the conversation
up to each assistant message twice, once ending in the generation prompt and once including the message: the
characters in between are what the model must produce (the answer and the template's end-of-turn marker).
The full text is tokenized once, and the tokens holding characters of those spans are the targets. This works
with any template that renders conversations prefix-stably, with no ``{% generation %}`` markers needed.

Templates that render a conversation differently depending on where it ends (Qwen3's adds an empty
``<think></think>`` block to the last assistant turn; Mistral's puts the system prompt into the last user turn)
are not prefix-stable at the earlier turns. There the turn is found in the full text instead: the conversation is
rendered once more with each message's content replaced by a marker, which places every content exactly (a short
or empty answer cannot be mistaken for template text); the turn is its content plus the end-of-turn text the
template puts after it.

Targets are the tokens that hold a character of a turn (as ``return_assistant_tokens_mask`` counts them in
transformers): a SentencePiece token such as ``▁paris`` starts at the space before the content.
"""

from __future__ import annotations

import re
from collections.abc import Callable

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
    located_full: list | None = None  # the full text's contents, placed once per row (only when a turn needs them)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # HF refuses to render an empty conversation: an opening assistant message has no generation prompt
        start = render(messages[:i], True) if i else None
        end = render(messages[: i + 1], False)
        if start is not None and full.startswith(start) and full.startswith(end) and len(start) <= len(end):
            span = (len(start), len(end))
        else:
            bare = render(messages[:i], False) if i else ""
            prompt = start[len(bare):] if start is not None and start.startswith(bare) else ""
            if located_full is None:
                located_full = _locate(full, messages, render) or []
            span = _turn_in_full_text(full, located_full, end, messages, i, render, prompt)
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
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (offsets[:, 1] > a) & (offsets[:, 0] < b)
    return ids, mask


def _turn_in_full_text(full: str, located_full: list[tuple[int, int]], last: str, messages: Messages, i: int,
                       render: Callable[[Messages, bool], str], prompt: str) -> tuple[int, int] | None:
    """Character span in ``full`` of assistant message ``i``, for templates that render a conversation differently
    depending on where it ends (Qwen3's think block on the last assistant turn; Mistral's system prompt inside the
    last user turn).

    The contents of the messages up to ``i`` are placed in ``full`` (``located_full``: :func:`_locate` of it, empty
    when that failed) and in ``last`` (the conversation rendered up to and with message ``i``); the turn is the
    content followed by the end-of-turn text that ``last`` puts after it, and preceded by the template text between the generation prompt (``prompt``, what
    ``add_generation_prompt`` appends) and the content, if ``full`` has that prompt before it (Qwen3's think block
    on a last assistant turn that follows another). None when that does not locate it unambiguously: a content the
    template rewrote, more template text before the content than ``last`` has there, or a different end of turn.
    """
    located_last = _locate(last, messages[: i + 1], render)
    if not located_full or located_last is None:
        return None
    located_full = located_full[: len(located_last)]

    def previous_end(located):  # where the template text before the last content begins
        return located[-2][1] if len(located) > 1 else 0

    if located_full[-1][0] - previous_end(located_full) > located_last[-1][0] - previous_end(located_last):
        return None
    end_of_turn = last[located_last[-1][1]:]
    at, stop = located_full[-1]
    if not full.startswith(end_of_turn, stop):
        return None
    cut = full.rfind(prompt, previous_end(located_full), at) if prompt else -1
    return (cut + len(prompt) if cut >= 0 else at), stop + len(end_of_turn)


_MARKER = "\ue000{}\ue001"  # private-use characters: neither templates nor text use them
_MARKERS = re.compile("\ue000(\\d+)\ue001")


def _locate(text: str, messages: Messages, render: Callable[[Messages, bool], str]) -> list[tuple[int, int]] | None:
    """``(start, end)`` in ``text`` (``messages`` rendered) of each non-system message's content, in order.

    The messages are rendered again with markers for their contents: ``text`` must be that rendering with each
    marker replaced by its content (as written, or stripped for templates that ``| trim`` it). None otherwise (the
    template rewrote a content or renders by content) or when a content is missing or appears twice.
    """
    if not all(isinstance(m.get("content"), str) for m in messages):
        return None
    try:
        marked = render([{**m, "content": _MARKER.format(k)} for k, m in enumerate(messages)], False)
    except ValueError:
        return None
    pieces = _MARKERS.split(marked)  # template text, marker index, template text, ...
    found: dict[int, tuple[int, int]] = {}
    pos = 0
    for j in range(0, len(pieces), 2):
        if not text.startswith(pieces[j], pos):
            return None
        pos += len(pieces[j])
        if j + 1 == len(pieces):
            break
        k = int(pieces[j + 1])
        content = messages[k]["content"]
        content = content if text.startswith(content, pos) else content.strip()
        if k in found or not text.startswith(content, pos):
            return None
        found[k] = (pos, pos + len(content))
        pos += len(content)
    wanted = [k for k, m in enumerate(messages) if m["role"] != "system"]
    if pos != len(text) or any(k not in found for k in wanted):
        return None
    return [found[k] for k in wanted]


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
