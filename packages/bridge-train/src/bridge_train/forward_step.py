"""The GPT forward step: one micro-batch through the model, and the masked next-token loss.

``gpt_forward_step(data_iterator, model)`` has the signature megatron-core's pipeline schedules call, so it (or any
function like it) is passed to ``pretrain`` / ``finetune`` as is. Batches follow bridge-data's sample contract
(``tokens``, ``labels``, ``loss_mask``, ``position_ids`` and, for packed rows, ``cu_seqlens``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

__all__ = ["ForwardStepSignatureError", "adapt_forward_step", "batch_to_device", "gpt_forward_step", "masked_next_token_loss",
           "masked_next_token_loss_sum"]

_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _stage_flags(model) -> tuple[bool, bool]:
    from megatron.core.utils import unwrap_model

    module = unwrap_model(model)
    return bool(getattr(module, "pre_process", True)), bool(getattr(module, "post_process", True))


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch to ``device``; packed rows (with ``cu_seqlens``) become one ``[1, B*S]`` row."""
    from bridge_data import packed_seq_params_from_batch

    packed = packed_seq_params_from_batch(batch) if "cu_seqlens" in batch else None
    out = {k: batch[k].to(device, non_blocking=True) for k in _KEYS}
    if packed is not None:
        out = {k: v.reshape(1, -1) for k, v in out.items()}
        for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            value = getattr(packed, name, None)
            if value is not None:
                setattr(packed, name, value.to(device, non_blocking=True))
    out["packed_seq_params"] = packed
    return out


def masked_next_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean loss over the tokens ``loss_mask`` selects, in the form megatron-core's schedules expect.

    Returns:
        ``(loss, {"lm loss": loss.detach()})``; the schedule divides by the number of micro-batches and DDP
        averages over data-parallel ranks.
    """
    mask = loss_mask.reshape(-1).float()
    losses = per_token_loss.reshape(-1).float()
    tokens = mask.sum()
    loss = (losses * mask).sum() / tokens.clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}


def masked_next_token_loss_sum(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """The loss summed over the tokens ``loss_mask`` selects, and their number (``model.calculate_per_token_loss``).

    Returns:
        ``(loss sum, token count, {"lm loss": [sum, count]})``: megatron-core adds up the counts of all micro-batches
        and data-parallel ranks and divides the gradients by the total, so every token of the global batch weighs
        the same however it is split into micro-batches (the mean per micro-batch weighs a short answer's tokens
        more); the loop logs the sum over the total.
    """
    mask = loss_mask.reshape(-1).float()
    loss = (per_token_loss.reshape(-1).float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.detach().float()])}


def gpt_forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model) -> tuple[torch.Tensor, Callable]:
    """Run one micro-batch; megatron-core's schedules call it with this rank's data iterator and model chunk.

    Every stage reads the batch, so all data iterators stay in step (one resumable position per run) and middle
    stages get the packed-sequence boundaries their attention needs; the first stage feeds tokens and positions,
    the last computes the loss.
    """
    from megatron.core.utils import get_model_config

    from bridge_convert.runtime import get_parallel_state

    first, last = _stage_flags(model)
    batch = batch_to_device(next(data_iterator), get_parallel_state().device)
    output = model(batch["tokens"] if first else None, batch["position_ids"] if first else None, None,
                   labels=batch["labels"] if last else None, packed_seq_params=batch["packed_seq_params"],
                   loss_mask=batch["loss_mask"] if last else None)
    per_token = getattr(get_model_config(model), "calculate_per_token_loss", False)
    return output, partial(masked_next_token_loss_sum if per_token else masked_next_token_loss, batch["loss_mask"])


class ForwardStepSignatureError(TypeError):
    """The forward step passed to ``pretrain`` / ``finetune`` has neither accepted signature."""


def adapt_forward_step(forward_step: Callable, state) -> Callable:
    """``forward_step`` in the ``(data_iterator, model)`` form megatron-core's schedules call.

    A Megatron Bridge-style ``forward_step(state, data_iterator, model)`` gets ``state`` (the
    :class:`bridge_train.setup.TrainingRun`: ``cfg``, ``train_state``, ``model``, ...) bound as its first
    argument; any other signature is refused here rather than with a TypeError deep in the schedule, and what the
    step and its loss function return is checked when they are called.

    Raises:
        ForwardStepSignatureError: a TypeError naming the function, its signature and the two accepted ones.
    """
    import inspect

    if forward_step is gpt_forward_step:
        return forward_step
    name = getattr(forward_step, "__qualname__", repr(forward_step))
    try:
        signature = inspect.signature(forward_step)
    except (TypeError, ValueError):  # a builtin or C callable: trust it
        return _checked_returns(forward_step, name)
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    required_kw = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if not required_kw:
        if len(required) == 3 or (len(required) < 3 <= len(positional) and positional[0].name == "state"):
            return _checked_returns(partial(forward_step, state), name)
        if len(required) <= 2 and (len(positional) >= 2 or varargs):
            return _checked_returns(forward_step, name)
    raise ForwardStepSignatureError(f"forward_step {name}{signature} has an unsupported signature; expected "
                    "forward_step(data_iterator, model) -> (output, loss_func), or Megatron Bridge's "
                    "forward_step(state, data_iterator, model)")


def _shape(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _checked_returns(forward_step: Callable, name: str) -> Callable:
    """``forward_step`` whose result and loss function's result are checked: the schedule unpacked them with a bare
    ValueError / TypeError of its own."""
    expected = "(loss, {'lm loss': ...}) or (loss, tokens, {'lm loss': ...})"

    def checked_loss(loss_func: Callable) -> Callable:
        def loss(output_tensor):
            result = loss_func(output_tensor)
            if not (isinstance(result, tuple) and len(result) in (2, 3)):
                raise ForwardStepSignatureError(f"the loss function of forward_step {name} returned {_shape(result)};"
                                                f" it must return {expected}")
            return result
        return loss

    def step(*args):  # (data_iterator, model[, checkpoint_activations_microbatch])
        result = forward_step(*args)
        if not (isinstance(result, tuple) and len(result) == 2 and callable(result[1])):
            raise ForwardStepSignatureError(f"forward_step {name} returned {_shape(result)}; it must return "
                                            f"(output_tensor, loss_func), loss_func(output_tensor) returning {expected}")
        return result[0], checked_loss(result[1])

    return step
