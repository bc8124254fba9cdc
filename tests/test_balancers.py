"""Balancer rounding and the fixed splits shipped with the engine."""
import itertools
import random

import pytest

from dynbatch_core.balancers import build_balancer, largest_remainder_split


def test_weights_3_13_split_16_exactly():
    assert build_balancer("weights", 2, rank_weights=[3, 13]).split(16) == [3, 13]


def test_equal_split_gives_the_remainder_to_the_lowest_ranks():
    assert build_balancer("equal", 3).split(10) == [4, 3, 3]
    assert build_balancer("equal", 4).split(64) == [16, 16, 16, 16]


def test_largest_remainder_always_sums_to_total_and_respects_bounds():
    rng = random.Random(0)
    for _ in range(2000):
        count = rng.randint(1, 6)
        weights = [rng.uniform(0.01, 10) for _ in range(count)]
        low = rng.randint(0, 3)
        high = rng.choice([None, rng.randint(max(low, 1), 50)])
        cap = high if high is not None else 10**6
        total = rng.randint(count * low, min(count * cap, 400))
        sizes = largest_remainder_split(total, weights, min_size=low, max_size=high)
        assert sum(sizes) == total
        assert all(low <= s <= cap for s in sizes)


def test_largest_remainder_is_proportional_when_bounds_do_not_bind():
    assert largest_remainder_split(100, [3, 1]) == [75, 25]
    assert largest_remainder_split(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder_split(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # quotas 3.5, 1.75, 1.75


def test_max_rank_batch_moves_the_excess_to_other_ranks():
    balancer = build_balancer("weights", 2, rank_weights=[9, 1], max_rank_batch=50)
    assert balancer.split(64) == [50, 14]


def test_impossible_split_is_refused():
    with pytest.raises(ValueError, match="cannot split 3 into 4"):
        largest_remainder_split(3, [1, 1, 1, 1])


def test_unknown_balancer_lists_the_choices():
    with pytest.raises(ValueError, match="equal"):
        build_balancer("nope", 2)
