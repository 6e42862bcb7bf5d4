"""TP=2 parity on two gloo processes: the native spec (with and without sequence parallelism, vocab-parallel fused
loss, with and without the SwiGLU / norm output recomputes) against a world-size-1 run of megatron-core's local
spec with the same weights."""

import pytest
import torch
import torch.distributed as dist
from _native_models import build, grads, randomise_norms

from bridge_convert.runtime import ParallelLayout, initialize_parallel
from bridge_convert.testing import full_state_dict, run_multiprocess, shard_state_dict

B, S, V, TOL = 2, 48, 128, 1e-5


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.2).float()
    return ids, labels, mask, torch.arange(S).expand(B, S)


def _step(model, batch):
    ids, labels, mask, pos = batch
    loss = model(ids, pos, None, labels=labels, loss_mask=mask)
    ((loss * mask).sum() / mask.sum()).backward()
    return loss.detach()


def _tp2_body(full, ref_loss, ref_grads):
    state = initialize_parallel(ParallelLayout(tensor_model_parallel_size=2))
    out = {}
    lean = dict(recompute_activation_output=True, recompute_granularity="selective", recompute_modules=["layernorm"])
    for sp, recompute in ((False, False), (True, False), (False, True), (True, True)):
        model = build("native", tensor_model_parallel_size=2, sequence_parallel=sp, **(lean if recompute else {}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(shard_state_dict(full, model, state.tp_rank, state.tp_size)[name])
        loss = _step(model, _batch())
        for p in model.parameters():  # what finalize_model_grads does for sequence-parallel norms
            if sp and getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=state.tp_group)
        want = shard_state_dict(ref_grads, model, state.tp_rank, state.tp_size)
        out[f"sp={sp},recompute={recompute}"] = {
            "loss": (loss - ref_loss).abs().max().item(),
            "grad": max((g - want[n]).abs().max().item() for n, g in grads(model).items()),
            "vocab_shard": model.output_layer.weight.shape[0],
        }
    return out


@pytest.mark.multiproc
def test_tp2_native_matches_local_tp1():
    initialize_parallel()
    local = build("local")
    randomise_norms(local)
    full = full_state_dict(local)
    ref_loss = _step(local, _batch())
    results = run_multiprocess(_tp2_body, 2, full, ref_loss, grads(local))
    for rank, result in enumerate(results):
        for variant, diffs in result.items():
            assert diffs["vocab_shard"] == V // 2, (rank, variant, diffs)
            assert diffs["loss"] <= TOL and diffs["grad"] <= TOL, (rank, variant, diffs)
