"""Output projection + vocab-parallel cross entropy without the full logits tensor.

megatron-core's GPT loss materialises ``[s, b, V/tp]`` logits in the activation dtype, an fp32 copy of them
and an fp32 softmax kept for the backward: at seq 4096, micro-batch 8 and Llama 3's 128k vocabulary that is
~40 GB. :func:`fused_linear_cross_entropy` computes the same per-token loss chunk by chunk over tokens, so only
one chunk's logits exist at a time (about 1 GiB of fp32 by default).

Gradients. The loss is per token, and the weight a token's loss gets downstream (the loss mask, the
normalisation) is only known in backward. When the caller passes ``loss_weights`` (megatron's ``loss_mask``)
the gradients are computed in the forward pass, weighted by it, while each chunk's logits are at hand
(no second pass over the output matmul, as liger-kernel's fused linear cross entropy does); the backward
then checks that the incoming per-token gradient is ``c x loss_weights`` for one scalar ``c`` (true for
megatron's masked sum / mean, and for gradient scaling) and only scales. If it is not, the backward recomputes
each chunk's logits and folds in the true per-token gradient: always exact, one extra output matmul.

Tensor parallelism. The weight is this rank's vocab shard ``[V/tp, H]``; the softmax statistics are all-reduced
over ``tp_group`` exactly like ``tensor_parallel.vocab_parallel_cross_entropy``, and the input gradient is
summed by megatron's own ``copy_to_tensor_model_parallel_region`` (or reduce-scattered by
``gather_from_sequence_parallel_region`` with sequence parallelism). Labels outside ``[0, V)`` behave as in
megatron (no target logit; mask them out).

On CUDA the elementwise parts of each chunk run as ``torch.compile``'d kernels: one reduction (log-sum-exp and
target logit; max, then sum-exp under TP, with megatron's operation order) and one pointwise pass for the
softmax gradient. On CPU the same functions run eagerly.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from .wgrad import accumulate_weight_grad

__all__ = ["DEFAULT_CHUNK_BYTES", "fused_linear_cross_entropy"]

DEFAULT_CHUNK_BYTES = 1 << 30
"""fp32 bytes of one chunk's logits: chunk tokens = this / (4 x local vocab), rounded down to a multiple of 128."""


def _row_max(logits: Tensor) -> Tensor:
    return logits.float().amax(dim=-1)


def _sumexp_and_target(logits: Tensor, row_max: Tensor, target: Tensor, in_range: Tensor) -> tuple[Tensor, Tensor]:
    """Vocab-parallel statistics (before their all-reduce): sum of exp(x - max) and the target's x - max."""
    shifted = logits.float() - row_max.unsqueeze(-1)
    sum_exp = shifted.exp().sum(dim=-1)
    picked = shifted.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return sum_exp, torch.where(in_range, picked, torch.zeros_like(picked))


def _lse_and_target(logits: Tensor, target: Tensor, in_range: Tensor) -> tuple[Tensor, Tensor]:
    """Single-shard statistics in one reduction: log-sum-exp, and the loss ``lse - x[target]``.

    A label outside the vocabulary contributes ``x - max = 0`` as in megatron, i.e. its loss is ``lse - max``.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return lse, lse - torch.where(in_range, target_logit, x.amax(dim=-1))


def _softmax_grad(logits: Tensor, lse: Tensor, target: Tensor, in_range: Tensor,
                  token_weight: Tensor | None) -> Tensor:
    """``(softmax - one_hot(target)) * token_weight`` in the logits' dtype, as one pointwise pass.

    The one-hot term is a comparison with a column index rather than a scatter into a zero tensor, so a
    compiled kernel never writes a second vocab-sized buffer.
    """
    grad = (logits.float() - lse.unsqueeze(-1)).exp()
    columns = torch.arange(logits.shape[-1], device=logits.device)
    hit = (columns.unsqueeze(0) == target.unsqueeze(-1)) & in_range.unsqueeze(-1)
    grad = torch.where(hit, grad - 1.0, grad)
    if token_weight is not None:
        grad = grad * token_weight.unsqueeze(-1)
    return grad.to(logits.dtype)


_KERNELS = {"max": _row_max, "stats": _sumexp_and_target, "lse": _lse_and_target, "grad": _softmax_grad}


@functools.cache
def _compiled(name: str):
    return torch.compile(_KERNELS[name])


def _kernel(name: str, device: torch.device):
    if device.type == "cuda":
        return _compiled(name)
    return _KERNELS[name]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, loss_weights: Tensor | None, tp_group,
                chunk: int) -> Tensor:
        tokens, vocab_local = hidden.shape[0], weight.shape[0]
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        vocab_start = tp_rank * vocab_local
        local_target = target - vocab_start
        in_range = (local_target >= 0) & (local_target < vocab_local)
        local_target = torch.where(in_range, local_target, torch.zeros_like(local_target))
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # A frozen output layer (PEFT) needs no weight-gradient GEMM and no [vocab, hidden] fp32 buffer.
        want_weight = ctx.needs_input_grad[1]
        loss = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty_like(loss)
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_fn = _kernel("grad", hidden.device)
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            h, t, r = hidden[start:end], local_target[start:end], in_range[start:end]
            logits = h @ weight.t()
            if tp_size == 1:
                lse, loss[start:end] = _kernel("lse", hidden.device)(logits, t, r)
            else:
                # megatron's vocab_parallel_cross_entropy: global max, then global sum-exp and target logit.
                row_max = _kernel("max", hidden.device)(logits)
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
                sum_exp, picked = _kernel("stats", hidden.device)(logits, row_max, t, r)
                both = torch.stack((sum_exp, picked))
                dist.all_reduce(both, op=dist.ReduceOp.SUM, group=tp_group)
                sum_exp, picked = both[0], both[1]
                loss[start:end] = torch.log(sum_exp) - picked
                lse = torch.log(sum_exp) + row_max
            lse_all[start:end] = lse
            if want_grads:
                w = loss_weights[start:end] if loss_weights is not None else None
                g = grad_fn(logits, lse, t, r, w)
                grad_hidden[start:end] = g @ weight
                if want_weight:
                    accumulate_weight_grad(h, g, grad_weight)
            del logits
        if grad_weight is not None and weight.dtype != torch.float32:
            # Held until the backward: in the weight's dtype (what autograd hands on anyway), not fp32. For the
            # 128k x 2k bf16 embedding of Llama 3 that is 0.5 GB less at the forward's end, the peak of memory.
            grad_weight = grad_weight.to(weight.dtype)
        ctx.tp_group, ctx.tp_size, ctx.chunk = tp_group, tp_size, chunk
        ctx.has_weights = loss_weights is not None
        ctx.save_for_backward(hidden, weight, local_target, in_range, lse_all, loss_weights, grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, local_target, in_range, lse_all, loss_weights, grad_hidden, grad_weight = ctx.saved_tensors
        grad_loss = grad_loss.float()
        if grad_hidden is not None:
            scale = _uniform_scale(grad_loss, loss_weights, ctx.tp_group, ctx.tp_size)
            if scale is not None:
                # In place: these buffers belong to this graph alone, and the backward runs at peak memory.
                # (an fp32 0-dim tensor: a bf16 buffer is scaled in fp32 arithmetic and rounded once)
                grad_weight = grad_weight.mul_(scale).to(weight.dtype) if grad_weight is not None else None
                return grad_hidden.mul_(scale), grad_weight, None, None, None, None
        # The per-token gradient is not c x loss_weights: recompute each chunk with the true weights.
        want_weight = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_fn = _kernel("grad", hidden.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:end]
            logits = h @ weight.t()
            g = grad_fn(logits, lse_all[start:end], local_target[start:end], in_range[start:end],
                        grad_loss[start:end])
            grad_hidden[start:end] = g @ weight
            if want_weight:
                accumulate_weight_grad(h, g, grad_weight)
            del logits
        return (grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None, None, None)


def _uniform_scale(grad_loss: Tensor, loss_weights: Tensor | None, tp_group, tp_size: int) -> Tensor | None:
    """The scalar ``c`` with ``grad_loss == c * loss_weights`` (ones when None), or None if there is none.

    One host sync per backward; every TP rank takes the same branch (the decision is all-reduced).
    """
    weights = loss_weights if loss_weights is not None else torch.ones_like(grad_loss)
    norm = (weights * weights).sum()
    scale = torch.where(norm > 0, (grad_loss * weights).sum() / norm.clamp_min(1e-30), torch.zeros_like(norm))
    residual = (grad_loss - scale * weights).abs().max()
    ok = (residual <= 1e-6 * grad_loss.abs().max()).to(torch.int32)
    if tp_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=tp_group)
    return scale if bool(ok) else None


def _chunk_tokens(vocab_local: int, chunk_bytes: int, tokens: int) -> int:
    chunk = max(1, chunk_bytes // (4 * vocab_local))
    if chunk >= 128:
        chunk -= chunk % 128
    return max(1, min(chunk, tokens))


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    loss_weights: Tensor | None = None,
    tp_group=None,
    sequence_parallel: bool = False,
    chunk_tokens: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """Per-token cross entropy of ``hidden @ weight.T`` against ``labels``, never holding all logits.

    Args:
        hidden: decoder output ``[s, b, H]`` (``[s/tp, b, H]`` with sequence parallelism), megatron's layout.
        weight: the output layer's (or tied embedding's) vocab shard ``[V/tp, H]``.
        labels: ``[b, s]`` token ids, megatron's layout.
        loss_weights: ``[b, s]`` per-token weights the caller will apply to the loss (megatron's
            ``loss_mask``); lets the gradients be computed in the forward pass (see the module docstring).
        tp_group: tensor-parallel group (None or size 1: no communication).
        sequence_parallel: ``hidden`` is sequence-sharded over ``tp_group``.
        chunk_tokens: tokens per chunk (default: from ``chunk_bytes``).
        chunk_bytes: fp32 bytes of one chunk's logits when ``chunk_tokens`` is not given.

    Returns:
        ``[b, s]`` fp32 loss, as ``GPTModel.compute_language_model_loss`` returns it.
    """
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if sequence_parallel and tp_size > 1:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=tp_group)
    elif tp_size > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    flat_hidden = hidden.reshape(s * b, h)
    target = labels.transpose(0, 1).reshape(s * b)
    weights = None
    if loss_weights is not None:
        weights = loss_weights.transpose(0, 1).reshape(s * b).to(torch.float32)
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0], chunk_bytes, s * b)
    loss = _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, target, weights,
                                            tp_group if tp_size > 1 else None, chunk)
    return loss.view(s, b).transpose(0, 1).contiguous()
