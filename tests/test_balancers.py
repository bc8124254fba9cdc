"""Balancers: rounding, the fixed splits, and the learning ones (dbs, pid) on a simulated heterogeneous cluster."""
import io
import random

import pytest
import torch

from dynbatch_core.batching.balancer_base import largest_remainder_split
from dynbatch_core.batching.balancers import BALANCERS, build_balancer


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


# --- a tiny cluster simulator: rank i processes b samples in overhead + b / speed_i seconds ----------------------

OVERHEAD_S = 0.002


def step_seconds(rank_batches, speeds, *, overhead_s=OVERHEAD_S, noise=0.0, rng=None):
    """Compute seconds per rank; `noise` is a uniform multiplicative jitter (+-noise) drawn from `rng`."""
    return [(overhead_s + b / v) * (1 + (rng.uniform(-noise, noise) if noise else 0.0))
            for b, v in zip(rank_batches, speeds)]


def run_steps(balancer, global_batch, speeds, steps, **timing):
    """Split, 'train', observe; returns the split of every step."""
    splits = []
    for _ in range(steps):
        split = balancer.split(global_batch)
        splits.append(split)
        balancer.observe(step_seconds(split, speeds, **timing), split)
    return splits


def first_update_from_which_split_stays(splits_per_update, target, tolerance=1):
    """Index of the first update after which every later split equals it and lies within `tolerance` of target."""
    last = splits_per_update[-1]
    assert all(abs(a - b) <= tolerance for a, b in zip(last, target)), f"ends at {last}, not near {target}"
    index = len(splits_per_update) - 1
    while index > 0 and splits_per_update[index - 1] == last:
        index -= 1
    return index


def splits_per_update(balancer, global_batch, speeds, updates, **timing):
    every = balancer.balance_every
    return run_steps(balancer, global_batch, speeds, updates * every, **timing)[every - 1::every]


# --- pid ----------------------------------------------------------------------------------------------------------

def test_pid_converges_to_3_to_1_within_20_updates_then_stays_put_for_50():
    balancer = build_balancer("pid", 2, balance_every=10)
    after_update = [balancer.split(64)] + splits_per_update(balancer, 64, [300, 100], 70)
    settled = first_update_from_which_split_stays(after_update, [48, 16])
    assert settled <= 20
    assert after_update[settled:] == [[48, 16]] * (71 - settled)
    assert len(after_update[settled:]) > 50


@pytest.mark.parametrize("balance_every", [1, 2, 3])
def test_pid_dead_band_keeps_equal_ranks_still_under_3_percent_noise_and_updates_only_every_n_steps(balance_every):
    def splits_under_noise(dead_band):
        balancer = build_balancer("pid", 2, balance_every=balance_every, dead_band=dead_band)
        return run_steps(balancer, 256, [100, 100], 300, noise=0.03, rng=random.Random(1))

    # +-3 % jitter makes equal ranks' mean step times differ by at most 6 / 103 = 5.8 %, in any window
    assert {tuple(split) for split in splits_under_noise(dead_band=0.06)} == {(128, 128)}
    # without it the split follows the noise, but only after every balance_every-th observe()
    splits = splits_under_noise(dead_band=0.0)
    changed_at = [step for step in range(1, len(splits)) if splits[step] != splits[step - 1]]
    assert len(changed_at) >= 20  # 143, 45, 21 for balance_every 1, 2, 3
    assert all(step % balance_every == 0 for step in changed_at), changed_at
    assert min(later - earlier for earlier, later in zip(changed_at, changed_at[1:])) == balance_every


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pid_under_3_percent_noise_settles_near_3_to_1_and_oscillates_under_5_percent_of_b_over_n(seed):
    rng = random.Random(seed)
    balancer = build_balancer("pid", 2, balance_every=10)
    splits = run_steps(balancer, 256, [300, 100], 1000, noise=0.03, rng=rng)
    settled = [split[0] for split in splits[300:]]  # after 30 updates
    assert max(settled) - min(settled) <= 0.05 * 256 / 2
    assert all(abs(b - 192) <= 4 for b in settled)


def test_pid_tracks_a_slowdown_and_its_recovery_within_20_updates_each():
    balancer = build_balancer("pid", 2, balance_every=10)
    for speeds, target in (([100, 100], [32, 32]), ([100, 100 / 3], [48, 16]), ([100, 100], [32, 32])):
        after_update = splits_per_update(balancer, 64, speeds, 40)
        assert first_update_from_which_split_stays(after_update, target) <= 20


def test_pid_moves_a_share_by_at_most_max_change_of_1_over_n_per_update():
    balancer = build_balancer("pid", 4, balance_every=1, max_change=0.25, dead_band=0.0)
    for _ in range(80):
        before = balancer.weights()
        run_steps(balancer, 400, [1000, 100, 100, 100], 1, overhead_s=0.0)
        assert max(abs(a - b) for a, b in zip(before, balancer.weights())) <= 0.25 / 4 + 1e-12
    assert balancer.split(400) == [307, 31, 31, 31]  # quotas 400 * [10, 1, 1, 1] / 13 = 307.7, 30.8, 30.8, 30.8


def test_pid_restored_after_7_observes_makes_the_same_next_30_decisions():
    rng = random.Random(3)
    original = build_balancer("pid", 3, balance_every=5)
    run_steps(original, 90, [300, 100, 200], 7, noise=0.03, rng=rng)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = build_balancer("pid", 3, balance_every=5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(30):
        split = original.split(90)
        assert restored.split(90) == split
        compute_s = step_seconds(split, [300, 100, 200], noise=0.03, rng=rng)
        original.observe(compute_s, split)
        restored.observe(compute_s, split)
    assert restored.state_dict() == original.state_dict()
    assert original.split(90) != [30, 30, 30]  # it did learn something


def test_state_of_another_balancer_is_refused():
    with pytest.raises(ValueError, match="'dbs' on 2 ranks"):
        build_balancer("pid", 2).load_state_dict(build_balancer("dbs", 2).state_dict())


# --- dbs ----------------------------------------------------------------------------------------------------------

def test_dbs_splits_equally_in_the_first_epoch_then_by_last_epochs_throughput():
    balancer = build_balancer("dbs", 4)
    assert run_steps(balancer, 64, [200, 100, 100, 400], 5, overhead_s=0.0) == [[16, 16, 16, 16]] * 5
    balancer.end_epoch()  # measured: 200, 100, 100, 400 samples/s
    assert balancer.split(64) == [16, 8, 8, 32]
    assert balancer.split(100) == [25, 13, 12, 50]  # quotas 25, 12.5, 12.5, 50: the tie goes to the lower rank
    assert build_balancer("dbs", 4, max_rank_batch=24).split(64) == [16, 16, 16, 16]


def test_dbs_keeps_the_split_inside_an_epoch_and_reaches_equal_step_times():
    balancer = build_balancer("dbs", 2)
    for epoch in range(6):
        splits = run_steps(balancer, 64, [300, 100], 20)
        assert all(split == splits[0] for split in splits)
        balancer.end_epoch()
    assert balancer.split(64) == [48, 16]  # 0.002 + 48/300 = 0.002 + 16/100


def test_dbs_respects_max_rank_batch():
    balancer = build_balancer("dbs", 2, max_rank_batch=40)
    run_steps(balancer, 64, [300, 100], 5)
    balancer.end_epoch()
    assert balancer.split(64) == [40, 24]


# --- every balancer -----------------------------------------------------------------------------------------------

def test_every_balancer_sums_to_b_and_respects_min_and_max_rank_batch_on_random_measurements():
    rng = random.Random(0)
    for trial in range(300):
        name = list(BALANCERS)[trial % len(BALANCERS)]
        world_size = rng.randint(1, 5)
        low = rng.randint(1, 3)
        high = rng.choice([None, rng.randint(low + 1, 60)])
        balancer = build_balancer(name, world_size, rank_weights=[rng.uniform(0.1, 5) for _ in range(world_size)],
                                  min_rank_batch=low, max_rank_batch=high, balance_every=rng.randint(1, 3))
        for step in range(20):
            global_batch = rng.randint(world_size * low, world_size * (high or 100))
            split = balancer.split(global_batch)
            assert sum(split) == global_batch
            assert all(low <= b <= (high or global_batch) for b in split)
            short = rng.random() < 0.1  # the last step of an epoch may leave a rank empty
            observed = [0 if short and rng.random() < 0.5 else b for b in split]
            balancer.observe([b / rng.uniform(1, 500) if b else 0.0 for b in observed], observed)
            if step % 7 == 6:
                balancer.end_epoch()


def test_options_a_balancer_does_not_take_are_ignored_and_unknown_names_list_the_choices():
    options = dict(rank_weights=None, balance_every=10, pid_kp=0.5, pid_ki=0.1, pid_ema=0.3, dead_band=0.05,
                   max_change=0.25)
    for name in BALANCERS:
        assert build_balancer(name, 2, **options).split(64) == [32, 32]
    with pytest.raises(ValueError, match="choose from equal, weights, dbs, pid"):
        build_balancer("fastest", 2)
