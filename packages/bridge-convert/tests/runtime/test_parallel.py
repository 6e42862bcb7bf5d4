"""The runtime on CPU: world size 1, and TP=2 / PP=2 / DP=2 over two gloo processes.

The parity tests compare against a world-size-1 run of the same weights and batch; the shards are cut by
megatron-core's own partition attributes (``shard_state_dict``), independent of bridge-convert's mappings.
"""

import pytest
import torch

from bridge_convert.runtime import ParallelLayout, initialize_parallel
from bridge_convert.testing import (
    build_tiny_gpt,
    full_state_dict,
    run_multiprocess,
    shard_state_dict,
    tiny_transformer_config,
)

MICRO_BATCHES, MBS, SEQ = 4, 2, 16


def _batches(seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (MBS, SEQ), generator=g) for _ in range(MICRO_BATCHES)]


def _train_step(model, batches, *, ddp: bool = False) -> list[float]:
    """One megatron-core forward-backward over the microbatches; returns the last stage's per-microbatch losses."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, m):
        ids = next(data_iterator)
        out = m(ids, torch.arange(SEQ).expand(MBS, SEQ), None, labels=ids)
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    if ddp:
        model.finish_grad_sync()
    return [float(x["loss"]) for x in losses]


def _reference():
    """World-size-1 weights, losses and gradients (norm-free, summed over the microbatches like megatron)."""
    initialize_parallel()
    model = build_tiny_gpt(seed=3)
    full = full_state_dict(model)
    losses = _train_step(model, _batches())
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return full, losses, grads


def _load(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])


def _parallel_body(full, dp_batches_by_rank):
    """Runs on each of 2 ranks: TP=2, a TP=2 model with swapped fc2 shards, PP=2, then DP=2 (megatron DDP)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    out = {}
    st = initialize_parallel(ParallelLayout(tensor_model_parallel_size=2))
    model = build_tiny_gpt(tiny_transformer_config(tensor_model_parallel_size=2))
    _load(model, shard_state_dict(full, model, st.tp_rank, st.tp_size))
    out["tp2"] = _train_step(model, _batches())
    out["tp2_grad_shards"] = {n: p.grad.clone() for n, p in model.named_parameters()}

    # The negative control: the same model with the row-parallel fc2 shards of layer 0 exchanged between ranks.
    wrong = shard_state_dict(full, model, st.tp_rank, st.tp_size)
    wrong["decoder.layers.0.mlp.linear_fc2.weight"] = shard_state_dict(full, model, 1 - st.tp_rank, 2)[
        "decoder.layers.0.mlp.linear_fc2.weight"]
    _load(model, wrong)
    out["tp2_wrong_shard"] = _train_step(model, _batches())

    st = initialize_parallel(ParallelLayout(pipeline_model_parallel_size=2))
    model = build_tiny_gpt(tiny_transformer_config(pipeline_model_parallel_size=2))
    _load(model, shard_state_dict(full, model, 0, 1))
    out["pp2"] = _train_step(model, _batches())
    out["pp2_stage"] = st.pp_rank

    st = initialize_parallel(ParallelLayout())
    model = build_tiny_gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    _load(model, full)
    out["dp2"] = _train_step(ddp, dp_batches_by_rank[st.dp_rank], ddp=True)
    out["dp2_grads"] = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return out


@pytest.fixture(scope="module")
def parity():
    full, losses, grads = _reference()
    batches = _batches()
    per_dp_rank = [batches[0::2], batches[1::2]]
    ranks = run_multiprocess(_parallel_body, 2, full, per_dp_rank)
    return dict(full=full, losses=losses, grads=grads, ranks=ranks)


def test_initialize_parallel_world_size_one(runtime):
    assert (runtime.world_size, runtime.tp_size, runtime.pp_size, runtime.dp_size) == (1, 1, 1, 1)
    assert runtime.is_first_pp_stage and runtime.is_last_pp_stage
    assert initialize_parallel() is runtime


def test_initialize_parallel_rejects_layout_not_dividing_world(runtime):
    with pytest.raises(ValueError, match="tensor_model_parallel_size x pipeline_model_parallel_size"):
        initialize_parallel(ParallelLayout(tensor_model_parallel_size=2))


def test_layout_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="pipeline_model_parallel_size must be a positive integer"):
        ParallelLayout(pipeline_model_parallel_size=0)


def test_tiny_gpt_forward_backward_world_size_one(runtime):
    model = build_tiny_gpt()
    ids = torch.randint(0, 128, (2, SEQ))
    logits = model(ids, torch.arange(SEQ).expand(2, SEQ), None)
    assert logits.shape == (2, SEQ, 128)
    loss = model(ids, torch.arange(SEQ).expand(2, SEQ), None, labels=ids).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.multiproc
def test_tp2_loss_and_grads_match_world_size_one(parity):
    for rank in parity["ranks"]:
        torch.testing.assert_close(rank["tp2"], parity["losses"], rtol=0, atol=1e-5)
    # Gathering the TP gradient shards back gives the world-size-1 gradient.
    for name, grad in parity["grads"].items():
        shards = [r["tp2_grad_shards"][name] for r in parity["ranks"]]
        if shards[0].shape == grad.shape:
            torch.testing.assert_close(shards[0], grad, rtol=0, atol=1e-5)
        else:
            dim = next(d for d in range(grad.dim()) if shards[0].shape[d] != grad.shape[d])
            stride = 2 if "linear_fc1" in name else 1
            pieces = [torch.chunk(s, stride, dim=dim) for s in shards]
            gathered = torch.cat([pieces[r][k] for k in range(stride) for r in range(2)], dim=dim)
            torch.testing.assert_close(gathered, grad, rtol=0, atol=1e-5)


@pytest.mark.multiproc
def test_tp2_wrong_shard_changes_the_loss(parity):
    diff = max(abs(a - b) for a, b in zip(parity["ranks"][0]["tp2_wrong_shard"], parity["losses"]))
    assert diff > 1e-3


@pytest.mark.multiproc
def test_pp2_loss_matches_world_size_one(parity):
    last = next(r for r in parity["ranks"] if r["pp2_stage"] == 1)
    first = next(r for r in parity["ranks"] if r["pp2_stage"] == 0)
    assert first["pp2"] == []  # only the last stage computes the loss
    torch.testing.assert_close(last["pp2"], parity["losses"], rtol=0, atol=1e-5)


@pytest.mark.multiproc
def test_dp2_ddp_grads_match_world_size_one(parity):
    # Each DP rank ran half the microbatches; megatron DDP averages their gradients over DP.
    dp_losses = parity["ranks"][0]["dp2"] + parity["ranks"][1]["dp2"]
    ref = parity["losses"]
    torch.testing.assert_close(dp_losses, [ref[0], ref[2], ref[1], ref[3]], rtol=0, atol=1e-5)
    for rank in parity["ranks"]:
        for name, grad in parity["grads"].items():
            torch.testing.assert_close(rank["dp2_grads"][name], grad, rtol=0, atol=1e-5)
