"""Full-vocabulary logits from a (possibly pipeline- and tensor-parallel) megatron-core model.

Used by ``bridge-convert compare`` and the parity tests: runs megatron-core's own forward-only schedule (so the
pipeline stages exchange activations exactly as in training), gathers the vocab-parallel logits over TP, strips
the vocab padding and hands the result to every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .runtime import get_parallel_state

__all__ = ["forward_logits"]


@torch.no_grad()
def forward_logits(model: list, input_ids: torch.Tensor, *, vocab_size: int | None = None) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` (float32, on CPU) of ``input_ids``, identical on every rank.

    Args:
        model: this rank's model chunks, as returned by ``to_megatron_model``.
        input_ids: ``[batch, seq]`` token ids (the same on every rank).
        vocab_size: keep this many vocabulary entries (default: the provider's unpadded vocab size).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.utils import unwrap_model

    state = get_parallel_state()
    config = unwrap_model(model[0]).config
    vocab_size = vocab_size or config.vocab_size
    batch, seq = input_ids.shape
    tokens = input_ids.to(state.device)
    positions = torch.arange(seq, device=state.device).unsqueeze(0).expand(batch, seq)
    for chunk in model:
        chunk.eval()

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        out = chunk(tokens, positions, None)

        def collect(output, non_loss_data=True):
            return gather_from_tensor_model_parallel_region(output) if state.tp_size > 1 else output

        return out, collect

    # megatron-core's interleaved (virtual-pipeline) schedule needs at least PP micro-batches: run the same batch
    # that many times and keep the first output.
    micro_batches = state.pp_size if len(model) > 1 else 1
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(range(micro_batches)) for _ in model] if len(model) > 1 else iter([0]),
        model=model, num_microbatches=micro_batches, seq_length=seq, micro_batch_size=batch, forward_only=True,
        collect_non_loss_data=True,
    )
    logits = outputs[0][..., :vocab_size].float().contiguous() if state.is_last_pp_stage else None
    if state.pp_size > 1:
        if logits is None:
            logits = torch.empty(batch, seq, vocab_size, dtype=torch.float32, device=state.device)
        last = dist.get_process_group_ranks(state.pp_group)[-1]
        dist.broadcast(logits, src=last, group=state.pp_group)
    return logits.cpu()
