"""The cost-model balancer: affine fits, the exact integer min-max split, hysteresis, change detection."""
import io
import itertools
import random
import statistics

import pytest
import torch

from dynbatch_core.batching.balancers import build_balancer
from dynbatch_core.batching.cost_model import AffineCost, fit_affine, min_max_split, predicted_step_s


def brute_force_best(total, lines, min_size, max_size):
    best = None
    for sizes in itertools.product(range(min_size, max_size + 1), repeat=len(lines)):
        if sum(sizes) == total:
            value = predicted_step_s(sizes, lines)
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_split_is_the_exact_integer_optimum(seed):
    rng = random.Random(seed)
    count = rng.choice([2, 3, 4])
    lines = [AffineCost(rng.choice([0.0, rng.uniform(0, 0.05)]), rng.uniform(0.001, 0.01)) for _ in range(count)]
    min_size, max_size = rng.choice([0, 1, 2]), rng.choice([8, 12, 20])
    total = rng.randint(count * min_size, count * max_size)
    split = min_max_split(total, lines, min_size=min_size, max_size=max_size)
    assert sum(split) == total and all(min_size <= b <= max_size for b in split)
    assert predicted_step_s(split, lines) == pytest.approx(brute_force_best(total, lines, min_size, max_size),
                                                           abs=1e-12)


def test_a_fixed_cost_that_the_slowdown_multiplies_gives_the_slow_rank_less_than_its_speed_share():
    # 1x and 3x ranks, 10 ms per step + 1 ms per sample, B = 128: speed shares alone would give 96/32
    lines = [AffineCost(0.010, 0.001), AffineCost(0.030, 0.003)]
    assert min_max_split(128, lines) == [101, 27]
    # a memory bound that binds
    assert min_max_split(128, lines, max_size=90) == [90, 38]


def test_the_fit_recovers_a_line_and_ignores_outliers():
    points = [(b, 0.02 + 0.003 * b) for b in (20, 24, 28, 32, 36, 40)]
    line = fit_affine(points)
    assert (line.a_s, line.c_s) == pytest.approx((0.02, 0.003))
    spiky = points + [(30, 0.5), (26, 0.9)]  # two descheduled steps
    line = fit_affine(spiky)
    assert (line.a_s, line.c_s) == pytest.approx((0.02, 0.003), rel=0.05)
    assert fit_affine([(32, 0.1), (32, 0.11)]) is None  # one batch size: no line


def simulate(balancer, truth, global_batch, steps, noise=0.0, seed=0, new_size_penalty=0.0, late=None):
    """Feed the balancer the compute times `truth(step)` (AffineCost per rank) gives its own splits; a rank's first
    step at a batch size it has not run yet (and the run's first step) takes 1 + new_size_penalty times as long;
    `late(step)`, seconds per rank, is added to each step's times (a descheduled rank)."""
    rng = random.Random(seed)
    splits, sizes_run = [], [set() for _ in range(balancer.world_size)]
    for step in range(steps):
        split = balancer.split(global_batch)
        lines = truth(step)
        times = [line.time_s(b) * (1 + rng.uniform(-noise, noise)) for line, b in zip(lines, split)]
        times = [t * (1 + new_size_penalty) if step == 0 or b not in sizes else t
                 for t, b, sizes in zip(times, split, sizes_run)]
        if late is not None:
            times = [t + extra for t, extra in zip(times, late(step))]
        for sizes, b in zip(sizes_run, split):
            sizes.add(b)
        balancer.observe(times, split)
        splits.append(split)
    return splits


SLOW_1_3 = [AffineCost(0.010, 0.001), AffineCost(0.030, 0.003)]
SLOW_1_1_2_4 = [AffineCost(0.010 * k, 0.001 * k) for k in (1, 1, 2, 4)]


@pytest.mark.parametrize("truth, optimum", [(SLOW_1_3, [101, 27]), (SLOW_1_1_2_4, None)])
def test_without_noise_the_model_lands_on_the_optimum_and_stays(truth, optimum):
    world = len(truth)
    optimum = optimum or min_max_split(128, truth)
    splits = simulate(build_balancer("model", world), lambda step: truth, 128, 60)
    settled = next(step for step, split in enumerate(splits) if all(s == optimum for s in splits[step:]))
    assert settled <= 7, splits[:10]   # the first step is warm-up, not a measure


@pytest.mark.parametrize("penalty", [0.2, 0.3])
def test_slow_first_steps_at_new_sizes_neither_bias_the_split_nor_look_like_a_speed_change(penalty):
    """On CPU a rank's first step at a batch size it has not run yet takes 20-30 % longer (benchmarks/cost_model.py);
    every move of the split meets one. Rank 1 slows from 1x to 3x at step 40 and recovers at step 80."""
    def truth(step):
        k = 3 if 40 <= step < 80 else 1
        return [AffineCost(0.010, 0.001), AffineCost(0.010 * k, 0.001 * k)]
    splits = simulate(build_balancer("model", 2), truth, 128, 120, noise=0.02, new_size_penalty=penalty)
    for start, end, optimum in ((0, 40, 64), (40, 80, 27), (80, 120, 64)):
        settled = next(step for step in range(start, end) if all(abs(s[1] - optimum) <= 1 for s in splits[step:end]))
        assert settled - start <= 10, (start, splits[start:end])
        # counted as speed, the slow first steps bias the line: 24 or 26 held where 27 is optimal
        assert statistics.median(s[1] for s in splits[end - 20:end]) == optimum, (start, splits[start:end])


def test_under_timing_noise_the_split_holds_still_within_one_sample():
    splits = simulate(build_balancer("model", 2), lambda step: SLOW_1_3, 128, 200, noise=0.05)
    after = [split[1] for split in splits[10:]]
    assert max(after) - min(after) <= 2 and all(abs(b - 27) <= 1 for b in after), after
    changes = sum(1 for a, b in zip(after, after[1:]) if a != b)
    assert changes <= 4   # hysteresis: not a new split at every noisy step


def test_the_bound_binds_and_is_respected():
    splits = simulate(build_balancer("model", 2, max_rank_batch=90), lambda step: SLOW_1_3, 128, 30)
    assert splits[-1] == [90, 38] and all(max(split) <= 90 for split in splits)


def test_a_speed_change_is_followed_within_ten_steps():
    def truth(step):  # rank 1 slows from 1x to 3x at step 40 and recovers at step 80
        k = 3 if 40 <= step < 80 else 1
        return [AffineCost(0.010, 0.001), AffineCost(0.010 * k, 0.001 * k)]
    splits = simulate(build_balancer("model", 2), truth, 128, 120, noise=0.02)
    assert all(abs(split[1] - 64) <= 1 for split in splits[30:40])
    assert all(abs(split[1] - 27) <= 1 for split in splits[50:80]), splits[40:80]
    assert all(abs(split[1] - 64) <= 1 for split in splits[90:120]), splits[80:120]


def test_a_restored_model_balancer_decides_exactly_like_the_original():
    original = build_balancer("model", 2)
    simulate(original, lambda step: SLOW_1_3, 128, 7, noise=0.05)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = build_balancer("model", 2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert simulate(restored, lambda step: SLOW_1_3, 128, 30, noise=0.05, seed=1) == \
        simulate(original, lambda step: SLOW_1_3, 128, 30, noise=0.05, seed=1)
    fresh = build_balancer("model", 2)  # the state matters: a fresh balancer starts from the equal split
    assert fresh.split(128) == [64, 64] != restored.split(128)


@pytest.mark.slow
def test_a_training_run_fits_the_emulated_costs_exactly_and_trains_the_optimal_split(tmp_path):
    from dynbatch_core import RunConfig, run
    result = run(RunConfig(dataset="synthetic", model="resnet8", world_size=2, epochs=1, train_samples=384,
                           test_samples=32, initial_batch=64, balancer="model", slowdown=(1.0, 3.0),
                           emulated_sample_ms=2.0, emulated_step_ms=10.0, progress=False, out=str(tmp_path / "m")))
    assert result.steps.groupby("rank").slowdown.unique().map(list).tolist() == [[1.0], [3.0]]   # steps.csv says k
    last = result.steps[result.steps["step"] == 5].sort_values("rank")
    assert last["model_a_s"].tolist() == pytest.approx([0.010, 0.030])
    assert last["model_c_s"].tolist() == pytest.approx([0.002, 0.006])
    optimum = min_max_split(64, [AffineCost(0.010, 0.002), AffineCost(0.030, 0.006)])
    assert optimum == [51, 13]   # 10 + 2 x 51 = 112 ms >= 30 + 6 x 13 = 108 ms
    # steps 0-1 are warm-up (no measure), step 2 fits proportional lines from one batch size, step 3 spreads them
    assert result.steps.query("step >= 4").pivot(index="step", columns="rank", values="rank_batch").values.tolist() \
        == [optimum] * 2


def test_a_noisy_slow_rank_gets_no_slack_the_split_stays_the_min_max_split():
    """Rank 1 is 30 ms late every other step (a descheduled slow rank). Splits priced on each step's slowest rank
    gave it 5 samples of slack here (22 where 27 is the lines' optimum), which on real [1,3] runs lost 2-3 % of the
    throughput; now the split is the lines' (their fit sees the late steps a little: 26 or 27)."""
    splits = simulate(build_balancer("model", 2), lambda step: SLOW_1_3, 128, 80, noise=0.02,
                      late=lambda step: [0.0, 0.030 if step % 2 == 0 else 0.0])
    assert min_max_split(128, SLOW_1_3) == [101, 27]
    assert all(abs(split[1] - 27) <= 1 for split in splits[20:]), splits[20:]


def test_a_slope_flattened_by_load_keeps_the_fixed_cost_at_most_half_the_step():
    """Load made rank 0's times nearly flat in b (0.25 ms/sample where 1.1 was true): fitted as is, moving samples to
    it looked free. The line keeps its level at the window's batch size and at most half of it as fixed cost."""
    balancer = build_balancer("model", 2)
    for step in range(12):
        split = [90, 38] if step % 2 else [104, 24]
        balancer.observe([0.100 + 0.0002 * split[0], 0.004 * split[1]], split)
    line = balancer.cost_line(0)
    assert line.time_s(97) == pytest.approx(0.100 + 0.0002 * 97)
    assert line.a_s == pytest.approx(0.5 * line.time_s(97))
    assert line.c_s == pytest.approx(0.5 * line.time_s(97) / 97)
    assert balancer.cost_line(1).a_s == pytest.approx(0.0, abs=1e-9)   # a line that needs no floor keeps its fit
