"""Every balancer decision is O(n log n) and bit-identical to the implementation before the rewrite
(tests/reference_balancers.py): the integer splits on random inputs, the vectorised fits against the per-rank ones,
whole runs of every balancer with noise, spikes, a slowdown, changing B and clamps, and the state they end in."""
import math
import random
import time

import numpy as np
import pytest

import reference_balancers as reference
from dynbatch_core.batching import balancer_base, cost_model
from dynbatch_core.batching.balancer_base import largest_remainder_split
from dynbatch_core.batching.balancers import build_balancer
from dynbatch_core.batching.cost_model import AffineCost, min_max_split


def assert_identical(new, old, where="value"):
    """Equal values of equal types, floats bit for bit (0.0 is not -0.0), through dicts and lists."""
    assert type(new) is type(old), f"{where}: {type(new).__name__} {new!r} vs {type(old).__name__} {old!r}"
    if isinstance(new, float):
        assert new.hex() == old.hex() or (math.isnan(new) and math.isnan(old)), f"{where}: {new!r} vs {old!r}"
    elif isinstance(new, dict):
        assert new.keys() == old.keys(), f"{where}: keys {sorted(new)} vs {sorted(old)}"
        for key in new:
            assert_identical(new[key], old[key], f"{where}[{key!r}]")
    elif isinstance(new, (list, tuple)):
        assert len(new) == len(old), f"{where}: {len(new)} entries vs {len(old)}"
        for index, (a, b) in enumerate(zip(new, old)):
            assert_identical(a, b, f"{where}[{index}]")
    else:
        assert new == old, f"{where}: {new!r} vs {old!r}"


def outcome(function, *args, **kwargs):
    """The result, or the type of the exception raised."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the same error is part of being identical
        return type(error)


# --- the integer splits -------------------------------------------------------------------------------------------

def random_weights(rng: random.Random, count: int) -> list:
    kind = rng.choice(["uniform", "ties", "zeros", "skewed", "integers"])
    if kind == "uniform":
        return [rng.uniform(0.01, 10) for _ in range(count)]
    if kind == "ties":
        return [rng.choice([1.0, 2.5]) for _ in range(count)]
    if kind == "zeros":
        weights = [rng.choice([0.0, 0.0, rng.uniform(0, 3)]) for _ in range(count)]
        return weights if sum(weights) > 0 else weights[:-1] + [1.0]
    if kind == "skewed":   # a few large shares that tight clamps cut, leaving more units than ranks
        return [rng.choice([100.0, 1.0, 1.0, 0.3]) for _ in range(count)]
    return [rng.randint(0, 40) for _ in range(count - 1)] + [rng.randint(1, 40)]   # e.g. cut_to_remaining's sizes


def random_split_problem(rng: random.Random):
    """Mostly up to 40 ranks with any clamps (the scan the reference repeats per unit costs units x n); sometimes
    100-300 ranks, unclamped, so that the repair places up to n units."""
    if rng.random() < 0.03:
        count, min_size = rng.randint(100, 300), rng.choice([0, 1])
        return rng.randint(count * min_size, 40 * count), random_weights(rng, count), min_size, None
    count = rng.choice([rng.randint(1, 8), rng.randint(1, 40)])
    weights = random_weights(rng, count)
    min_size = rng.choice([0, 1, 1, rng.randint(2, 9)])
    max_size = rng.choice([None, None, min_size + rng.randint(0, 3), min_size + rng.randint(1, 60)])
    high = 200 if max_size is None else max_size
    total = rng.randint(count * min_size, count * high)
    return total, weights, min_size, max_size


def test_largest_remainder_split_is_identical_to_the_reference_on_random_inputs(monkeypatch):
    rng, more_units_than_ranks, shrunk = random.Random(0), 0, 0
    for _ in range(1200):
        total, weights, min_size, max_size = random_split_problem(rng)
        old = reference.largest_remainder_split(total, weights, min_size=min_size, max_size=max_size)
        for small_split in (0, 10**9):   # numpy arrays for any number of ranks, then Python lists
            monkeypatch.setattr(balancer_base, "SMALL_SPLIT", small_split)
            new = largest_remainder_split(total, weights, min_size=min_size, max_size=max_size)
            assert_identical(new, old, str((small_split, total, weights, min_size, max_size)))
        floors = [int(min(max(math.floor(total * w / float(sum(weights))), min_size), max_size or math.inf))
                  for w in weights]
        more_units_than_ranks += abs(total - sum(floors)) > len(weights)
        shrunk += sum(floors) > total
    assert more_units_than_ranks > 100 and shrunk > 50   # the clamps did push the repair past n, both ways


def test_largest_remainder_split_refuses_what_the_reference_refuses(monkeypatch):
    for total, weights, bounds in ((3, [1, 1, 1, 1], {}), (10, [], {}), (10, [1.0, -1.0], {}), (10, [0, 0], {}),
                                   (10, [1, 1], {"max_size": 4}), (10, [1.0, math.inf], {}),
                                   (10, [1.0, math.nan], {})):
        old = outcome(reference.largest_remainder_split, total, weights, **bounds)
        assert isinstance(old, type) and issubclass(old, Exception)
        for small_split in (0, 10**9):
            monkeypatch.setattr(balancer_base, "SMALL_SPLIT", small_split)
            assert outcome(largest_remainder_split, total, weights, **bounds) == old, (small_split, total, weights)


def random_lines(rng: random.Random, count: int) -> list[AffineCost]:
    kind = rng.choice(["uniform", "ties", "classes"])
    if kind == "ties":
        return [AffineCost(0.01, 0.002)] * count
    if kind == "classes":
        return [AffineCost(0.01 * k, 0.001 * k) for k in (rng.choice([1, 3]) for _ in range(count))]
    return [AffineCost(rng.choice([0.0, rng.uniform(0, 0.05)]), rng.uniform(1e-4, 0.01)) for _ in range(count)]


def test_min_max_split_is_identical_to_the_reference_on_random_lines_and_clamps():
    rng = random.Random(1)
    for _ in range(800):
        count = rng.choice([1, 2, 3, rng.randint(1, 30), rng.randint(30, 200)])
        lines = random_lines(rng, count)
        min_size = rng.choice([0, 1, rng.randint(2, 6)])
        max_size = rng.choice([None, min_size + rng.randint(0, 4), min_size + rng.randint(5, 80)])
        total = rng.randint(count * min_size, count * (300 if max_size is None else max_size))
        new = outcome(min_max_split, total, lines, min_size=min_size, max_size=max_size)
        assert_identical(new, outcome(reference.min_max_split, total, lines, min_size=min_size,
                                      max_size=max_size), str((total, lines, min_size, max_size)))


def test_min_max_split_gives_back_an_excess_as_the_reference_does(monkeypatch):
    """Sizes over the total (rounding at the breakpoints, never seen in random inputs): forced by raising both
    implementations' water level by the same few units of time, so that both give back from the slowest."""
    rng = random.Random(4)
    new_level, old_level = cost_model._continuous_level, reference._continuous_level
    for _ in range(100):
        count, bump = rng.randint(1, 60), rng.choice([0.002, 0.01, 0.05])
        monkeypatch.setattr(cost_model, "_continuous_level", lambda *args: new_level(*args) + bump)
        monkeypatch.setattr(reference, "_continuous_level", lambda *args: old_level(*args) + bump)
        lines = random_lines(rng, count)
        min_size, max_size = rng.choice([0, 1, 3]), rng.choice([None, rng.randint(4, 60)])
        total = rng.randint(count * min_size, count * (100 if max_size is None else max_size))
        assert_identical(outcome(min_max_split, total, lines, min_size=min_size, max_size=max_size),
                         outcome(reference.min_max_split, total, lines, min_size=min_size, max_size=max_size))


def test_min_max_split_refuses_what_the_reference_refuses():
    for total, lines in ((1, [AffineCost(0.01, 0.001)] * 2), (10, [AffineCost(0.01, 0.0)] * 2)):
        assert outcome(min_max_split, total, lines) == outcome(reference.min_max_split, total, lines)


def test_move_units_makes_the_choices_of_a_scan_over_all_ranks_per_unit():
    """Both directions, ranks that take one unit or several, the sorted rounds and the heap."""
    rng = np.random.default_rng(3)
    for _ in range(400):
        count = int(rng.integers(1, 30))
        fixed_s, per_sample_s = rng.choice([0.0, 0.01], count), rng.choice([0.001, 0.003, 0.0101], count)
        sizes = rng.integers(2, 12, count)
        step, units = int(rng.choice([-1, 1])), int(rng.integers(0, 3 * count))
        low, high = 1, int(rng.integers(12, 20))
        if step < 0:
            units = min(units, int((sizes - low).sum()))
            key, is_open = (lambda a, c, size: -(a + c * size)), (lambda size: size > low)
        else:
            units = min(units, int((high - sizes).sum()))
            key, is_open = (lambda a, c, size: a + c * (size + 1)), (lambda size: size < high)
        expected = sizes.tolist()
        for _ in range(units):
            rank = min((i for i in range(count) if is_open(expected[i])),
                       key=lambda i: (key(float(fixed_s[i]), float(per_sample_s[i]), expected[i]), i))
            expected[rank] += step
        for monotone in (True, False):   # False: the heap alone
            moved = cost_model.move_units(sizes, units, step, key, (fixed_s, per_sample_s), is_open, monotone)
            assert moved.tolist() == expected


# --- the fits, all ranks at once ----------------------------------------------------------------------------------

def random_windows(rng: np.random.Generator, count: int, width: int):
    """(batch, seconds, measured) windows: one to a few batch sizes, rising, falling, tiny and negative-intercept
    lines, 5 % noise, spikes, unmeasured steps."""
    centre = rng.integers(4, 60, count)[:, None]
    batch = (centre + rng.choice([0, 0, 1, -1, 3, 8], (count, width)) * rng.integers(0, 2, (count, 1)))
    batch = np.maximum(batch, 0).astype(np.float64)
    fixed_s = rng.choice([0.01, 0.05, -0.01], (count, 1))             # 0.05 with a falling slope, -0.01: a < 0
    per_sample_s = np.where(fixed_s == 0.05, -0.0005, rng.choice([0.001, 0.002], (count, 1)))
    scale = rng.choice([1.0, 1.0, 1e-10], (count, 1))                   # 1e-10: slopes under MIN_COST_PER_SAMPLE_S
    seconds = scale * np.abs(fixed_s + per_sample_s * batch) * np.exp(0.05 * rng.standard_normal((count, width)))
    seconds[rng.random((count, width)) < 0.05] *= 3.0
    measured = rng.random((count, width)) > rng.choice([0.0, 0.2, 0.9], (count, 1))
    return batch, seconds, measured


def test_the_fits_over_all_ranks_at_once_are_bit_identical_to_the_per_rank_fits():
    rng = np.random.default_rng(2)
    for width in (1, 2, 5, 24):
        batch, seconds, measured = random_windows(rng, 400, width)
        gap = rng.choice([0.0, 2.0 - 1e-9, 3.2], 400)
        fixed_s, per_sample_s, fitted = cost_model.fit_affine_rows(batch, seconds, measured, gap)
        ratio_c, ratio_ok = cost_model.proportional_fit_rows(batch, seconds, measured)
        spreads = cost_model.residual_spread_rows(batch, seconds, measured, fixed_s, per_sample_s)
        medians = cost_model.median_rows(seconds, measured)
        for rank in range(400):
            points = [(b, t) for b, t, m in zip(batch[rank].tolist(), seconds[rank].tolist(),
                                                measured[rank].tolist()) if m]
            line = reference.fit_affine(points, min_gap=float(gap[rank]))
            assert_identical(None if not fitted[rank] else [float(fixed_s[rank]), float(per_sample_s[rank])],
                             None if line is None else [line.a_s, line.c_s], f"fit of row {rank}")
            ratio = reference.proportional_fit(points)
            assert_identical(float(ratio_c[rank]) if ratio_ok[rank] else None, ratio and ratio.c_s)
            if line is not None:
                assert_identical(float(spreads[rank]), reference.residual_spread_s(points, line))
            if points:
                assert_identical(float(medians[rank]), reference.statistics.median(t for _, t in points))


# --- whole runs of every balancer ---------------------------------------------------------------------------------

NAMES = ("equal", "weights", "dbs", "pid", "model")
# (balancer, ranks, seeds, steps); seed 1 has a max_rank_batch. The reference's O(n^2) rounding costs ~45 ms a
# step at 256 ranks, hence fewer steps there
RUNS = [(name, world_size, 2, 200) for world_size in (2, 4) for name in NAMES] + \
       [(name, 37, 2, 120) for name in NAMES] + [(name, 256, 1, 60 if name == "model" else 30) for name in NAMES]


def drive(name: str, world_size: int, seed: int, steps: int):
    """The new and the reference balancer side by side on one simulated run; returns both at the end."""
    rng = np.random.default_rng(seed)
    options = dict(rank_weights=rng.uniform(0.5, 4, world_size).tolist(), balance_every=int(rng.integers(1, 4)),
                   min_rank_batch=int(rng.choice([1, 1, 2])), max_rank_batch=None)
    if seed % 2:   # a memory bound that binds for the fast ranks
        options["max_rank_batch"] = int(rng.integers(36, 48))
    new, old = build_balancer(name, world_size, **options), reference.build_balancer(name, world_size, **options)
    slowdown = np.where(rng.random(world_size) < 0.5, 1.0, 3.0)
    fixed_s, per_sample_s = 0.010 * rng.uniform(0.9, 1.1, world_size), 0.001 * rng.uniform(0.9, 1.1, world_size)
    slowed = rng.random(world_size) < 0.3
    epoch_steps, global_batch = int(rng.choice([7, 20])), 32 * world_size + 7
    sizes_run = [set() for _ in range(world_size)]
    for step in range(steps):
        if rng.random() < 0.04:   # the schedule moves B
            global_batch = int(rng.integers(world_size * options["min_rank_batch"],
                                            world_size * (options["max_rank_batch"] or 60) + 1))
        split = new.split(global_batch)
        assert_identical(split, old.split(global_batch), f"{name} on {world_size} ranks, step {step}: split")
        speed = slowdown * np.where(slowed & (steps // 2 <= step < 4 * steps // 5), 2.5, 1.0)   # slows, recovers
        seconds = speed * (fixed_s + per_sample_s * np.array(split)) * np.exp(0.05 * rng.standard_normal(world_size))
        seconds *= np.where(rng.random(world_size) < 0.03, 3.0, 1.0)   # a descheduled rank
        seconds *= [1.25 if b not in sizes else 1.0 for b, sizes in zip(split, sizes_run)]   # a new shape
        for sizes, b in zip(sizes_run, split):
            sizes.add(b)
        observed = list(split)
        if (step + 1) % epoch_steps == 0 and rng.random() < 0.3 and name != "model":   # a short last step
            observed = [0 if rng.random() < 0.5 else b for b in split]
            seconds = np.where(np.array(observed) == 0, 0.0, seconds)
        new.observe(seconds.tolist(), observed)
        old.observe(seconds.tolist(), observed)
        if (step + 1) % epoch_steps == 0:
            new.end_epoch()
            old.end_epoch()
    return new, old


@pytest.mark.parametrize("name, world_size, seeds, steps", RUNS)
def test_every_split_and_the_final_state_are_identical_to_the_reference(name, world_size, seeds, steps):
    for seed in range(seeds):
        new, old = drive(name, world_size, seed, steps)
        assert_identical(new.state_dict(), old.state_dict(), f"{name} on {world_size} ranks: state")
        if name == "model":   # what the hold rule compares, not only what it decided
            assert_identical(new.residuals(), old.residuals())
            split = old.split(32 * world_size + 7)
            assert_identical(new._expected_step_s(np.array(split), new._residual_rows()),
                             reference.expected_step_s(split, old.lines, old.residuals()))


@pytest.mark.parametrize("name, options, dropped", [("pid", {}, None), ("model", {}, None),
                                                    ("model", {"model_window": 12}, None),   # windows too long
                                                    ("model", {}, "sizes_run")],             # an older checkpoint
                         ids=["pid", "model", "model-longer-windows", "model-without-sizes_run"])
def test_a_state_saved_by_the_reference_loads_and_decides_identically(name, options, dropped):
    _, saved = drive(name, 37, seed=5, steps=45)
    state = saved.state_dict()
    state.pop(dropped, None)
    options = dict(options, min_rank_batch=saved.min_rank_batch, max_rank_batch=saved.max_rank_batch,
                   balance_every=getattr(saved, "balance_every", None))
    new, old = build_balancer(name, 37, **options), reference.build_balancer(name, 37, **options)
    new.load_state_dict(state)
    old.load_state_dict(state)
    assert_identical(new.state_dict(), old.state_dict())
    rng = np.random.default_rng(6)
    for step in range(30):
        split = new.split(32 * 37 + 7)
        assert_identical(split, old.split(32 * 37 + 7), f"step {step}")
        seconds = ((0.01 + 0.001 * np.array(split)) * np.exp(0.05 * rng.standard_normal(37))).tolist()
        new.observe(seconds, split)
        old.observe(seconds, split)
    assert_identical(new.state_dict(), old.state_dict())


# --- the scaling itself -------------------------------------------------------------------------------------------

def test_the_rounding_repair_of_4096_ranks_takes_milliseconds_not_the_quadratic_seconds():
    """Quotas 32.9990 each leave 4095 units to place (a scan over all ranks per unit is ~17 M key evaluations, many
    seconds); tight clamps on a few large shares leave 3 units per rank (the heap path). Both well under a second."""
    count = 4096
    cases = [(33 * count - 4, [1.0] * count, {}),
             (5 * count, [100.0 if rank % 64 == 0 else 1.0 for rank in range(count)], {"max_size": 8})]
    for total, weights, bounds in cases:
        started = time.perf_counter()
        sizes = largest_remainder_split(total, weights, **bounds)
        assert time.perf_counter() - started < 0.5
        assert sum(sizes) == total
    assert sizes[:2] == [8, 5] and sizes.count(4) > 0   # the clamped ranks gave their units to the others
