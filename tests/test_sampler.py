"""RankShareSampler: each rank keeps its share of the samples for the whole run, in a new order every epoch."""

import pytest

from litgpt_skip2lora.sampler import RankShareSampler


def epoch_order(sampler: RankShareSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_shares_are_disjoint_cover_the_data_and_stay_with_their_rank() -> None:
    samplers = [RankShareSampler(10, world_size=3, rank=r, seed=5) for r in range(3)]
    firsts = [epoch_order(s, 0) for s in samplers]
    assert [len(order) for order in firsts] == [4, 4, 4]  # ceil(10 / 3): the two short shares repeat one sample
    distinct = [set(order) for order in firsts]
    assert sorted(i for share in distinct for i in share) == list(range(10))
    for sampler, first in zip(samplers, firsts):
        later = [epoch_order(sampler, epoch) for epoch in (1, 2, 3)]
        assert all(sorted(order) == sorted(first) for order in later)  # the same samples every epoch
        assert any(order != first for order in later)  # in another order


def test_the_order_depends_on_seed_and_epoch_only() -> None:
    a, b = RankShareSampler(50, 2, 1, seed=3), RankShareSampler(50, 2, 1, seed=3)
    assert epoch_order(a, 4) == epoch_order(b, 4)  # a resumed run replays the same order
    assert epoch_order(a, 4) != epoch_order(RankShareSampler(50, 2, 1, seed=4), 4)


def test_without_shuffle_a_share_is_every_world_size_th_sample() -> None:
    sampler = RankShareSampler(7, world_size=2, rank=1, shuffle=False)
    assert epoch_order(sampler, 0) == epoch_order(sampler, 1) == [1, 3, 5, 1]


def test_a_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(ValueError, match="rank must be in 0..1, got 2"):
        RankShareSampler(8, world_size=2, rank=2)
