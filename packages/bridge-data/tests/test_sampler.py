import pytest
import torch

from bridge_data.sampler import DistributedBatchSampler, build_dataloader


class _Indexed(torch.utils.data.Dataset):
    """Sample i holds the value i, so batches show exactly which samples were drawn."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": torch.full((4,), i, dtype=torch.int64), "labels": torch.zeros(4, dtype=torch.int64),
                "loss_mask": torch.ones(4), "position_ids": torch.arange(4)}


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_dp_ranks_split_each_global_step_without_overlap():
    samplers = [DistributedBatchSampler(20, micro_batch_size=2, dp_rank=r, dp_size=3) for r in range(3)]
    per_rank = [list(s) for s in samplers]
    assert [len(b) for b in per_rank] == [3, 3, 3]  # 20 // 6 steps; the partial last step is dropped
    for step in range(3):
        assert sum((per_rank[r][step] for r in range(3)), []) == list(range(6 * step, 6 * step + 6))


def test_shuffled_epochs_are_permutations_seeded_per_epoch():
    sampler = DistributedBatchSampler(12, micro_batch_size=3, dp_rank=0, dp_size=1, shuffle=True, seed=4,
                                      cycle=True)
    batches = _take(iter(sampler), 8)
    epoch0, epoch1 = sum(batches[:4], []), sum(batches[4:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1 and epoch0 != list(range(12))
    again = DistributedBatchSampler(12, micro_batch_size=3, dp_rank=0, dp_size=1, shuffle=True, seed=4, cycle=True)
    assert _take(iter(again), 8) == batches


def test_sampler_stops_after_one_epoch_without_cycle():
    sampler = DistributedBatchSampler(10, micro_batch_size=2, dp_rank=1, dp_size=2, consumed_samples=4)
    assert len(sampler) == 1
    assert list(sampler) == [[6, 7]]
    assert list(sampler) == [] and len(sampler) == 0


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_sampler_resume_matches_uninterrupted_run(shuffle):
    def make():
        return DistributedBatchSampler(10, micro_batch_size=2, dp_rank=1, dp_size=2, shuffle=shuffle, seed=3,
                                       cycle=True)

    reference = _take(iter(make()), 9)  # crosses two epoch boundaries (2 steps per epoch)
    first = make()
    head = _take(iter(first), 3)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + _take(iter(resumed), 6) == reference


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "two-workers"])
def test_dataloader_resume_matches_uninterrupted_run(num_workers):
    def make():
        return build_dataloader(_Indexed(40), micro_batch_size=2, dp_rank=0, dp_size=2, shuffle=True, seed=1,
                                num_workers=num_workers)

    reference = [b["tokens"][:, 0].tolist() for b in make()]
    loader = make()
    it = iter(loader)
    head = [next(it)["tokens"][:, 0].tolist() for _ in range(3)]
    state = loader.state_dict()  # workers have prefetched beyond batch 3; the state must not count those
    del it
    assert state["consumed_samples"] == 3 * 4
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [b["tokens"][:, 0].tolist() for b in resumed] == reference
    again = [b["tokens"][:, 0].tolist() for b in loader]  # a new iter() continues after the delivered batches
    assert head + again == reference


def test_resume_with_another_dp_size_continues_the_global_order():
    two_ranks = [DistributedBatchSampler(16, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for s in two_ranks:
        _take(iter(s), 2)
    one_rank = DistributedBatchSampler(16, micro_batch_size=4, dp_rank=0, dp_size=1)
    one_rank.load_state_dict(two_ranks[0].state_dict())
    assert next(iter(one_rank)) == [8, 9, 10, 11]


def _global_stream(n, dp_size, consumed, steps):
    ranks = [iter(DistributedBatchSampler(n, micro_batch_size=1, dp_rank=r, dp_size=dp_size, consumed_samples=consumed,
                                          shuffle=True, seed=3, cycle=True)) for r in range(dp_size)]
    return [i for _ in range(steps) for rank in ranks for i in next(rank)]


def test_cycling_resume_with_another_dp_size_past_an_epoch_continues_the_global_order():
    """10 samples in steps of 4 dropped 2 per epoch, and of 2 none: a resume at sample 16 on two ranks restarted in
    the middle of the epoch the four ranks had finished (samples served twice, others skipped)."""
    uninterrupted = _global_stream(10, 4, 0, 8)
    assert _global_stream(10, 2, 16, 8) == uninterrupted[16:]
    assert all(sorted(uninterrupted[e * 10:(e + 1) * 10]) == list(range(10)) for e in range(3))  # whole epochs


def test_resume_refuses_a_changed_order():
    saved = DistributedBatchSampler(10, micro_batch_size=1, dp_rank=0, dp_size=1, shuffle=True, seed=1).state_dict()
    other = DistributedBatchSampler(10, micro_batch_size=1, dp_rank=0, dp_size=1, shuffle=True, seed=2)
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        other.load_state_dict(saved)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dp_rank": 2, "dp_size": 2}, "dp_rank"), ({"micro_batch_size": 0}, "micro_batch_size"),
     ({"consumed_samples": -1}, "consumed_samples"), ({"micro_batch_size": 4, "dp_size": 3}, "fewer than one")],
    ids=["rank-out-of-range", "zero-batch", "negative-consumed", "dataset-too-small"],
)
def test_sampler_rejects_bad_arguments(kwargs, message):
    args = {"micro_batch_size": 1, "dp_rank": 0, "dp_size": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        DistributedBatchSampler(10, **args)


def test_cycling_sampler_has_no_length():
    with pytest.raises(TypeError):
        len(DistributedBatchSampler(10, micro_batch_size=1, dp_rank=0, dp_size=1, cycle=True))


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "two-workers"])
def test_iterating_leaves_the_global_rng_alone(num_workers):
    """torch's DataLoader drew its base seed from the global RNG when an iterator was built: a resumed run builds
    it after restoring the RNG state, so every dropout mask after a resume was one draw off the straight run's."""
    loader = build_dataloader(_Indexed(40), micro_batch_size=2, dp_rank=0, dp_size=1, shuffle=True, seed=1,
                              num_workers=num_workers)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = [b["tokens"][:, 0].tolist() for b in loader]
    assert torch.equal(torch.get_rng_state(), before)
    assert first == [b["tokens"][:, 0].tolist() for b in build_dataloader(
        _Indexed(40), micro_batch_size=2, dp_rank=0, dp_size=1, shuffle=True, seed=1)]  # the same order
