"""Per-rank affine step-time models and the exact integer split that minimises the slowest rank's predicted time.

    line = fit_affine([(32, 0.20), (36, 0.22), (28, 0.18)])       # AffineCost(a_s=0.04, c_s=0.005): t = a + c b
    split = min_max_split(128, [AffineCost(0.01, 0.003), AffineCost(0.03, 0.009)], min_size=1)   # -> [96, 32]
    predicted_step_s(split, lines)                                 # max_i (a_i + c_i b_i)

A rank's compute time for b samples is modelled as t_i(b) = a_i + c_i b: a fixed cost per step (kernel launches,
the optimizer's share, Python) plus a cost per sample. The fit is Theil-Sen (the median of pairwise slopes, then the
median intercept): robust to the odd descheduled step on a shared machine, with a_i >= 0 and c_i > 0 enforced.

The split: integers b_i in [min_size, max_size] with sum B that minimise max_i t_i(b_i). Water-filling on the lines
gives the continuous optimum T (sum_i clamp((T - a_i) / c_i) = B, solved over the sorted breakpoints); each b_i is
rounded down, and the few units left go one at a time to the rank whose time after taking it is smallest. Greedy
by marginal cost from a point below an optimum is exact for a min-max of increasing costs, so the result is the
integer optimum; ties go to the lower rank. O(n log n): move_units makes those one-at-a-time choices together.

The model balancer fits all ranks at once: fit_affine_rows, proportional_fit_rows and residual_spread_rows are
fit_affine, proportional_fit and residual_spread_s on every row of (ranks x window) arrays, with numpy, and give
the same floats bit for bit (elementwise IEEE operations in the same order, medians picked from sorted rows as
statistics.median picks them); tests/test_decision_scaling.py checks them against the per-rank functions.
"""
from __future__ import annotations

import functools
import heapq
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

MIN_COST_PER_SAMPLE_S = 1e-9


@dataclass(frozen=True)
class AffineCost:
    a_s: float   # seconds per step, whatever the batch
    c_s: float   # seconds per sample

    def time_s(self, batch: float) -> float:
        return self.a_s + self.c_s * batch

    def scaled(self, factor: float) -> "AffineCost":
        return AffineCost(self.a_s * factor, self.c_s * factor)


def fit_affine(points: Sequence[tuple[float, float]], min_gap: float = 0.0) -> AffineCost | None:
    """Theil-Sen line through (batch, seconds) points, its slope the median over pairs whose batch sizes differ by
    more than `min_gap` (a slope from sizes close together is mostly timing noise); None without such a pair."""
    slopes = [(t2 - t1) / (b2 - b1) for i, (b1, t1) in enumerate(points) for b2, t2 in points[i + 1:]
              if abs(b2 - b1) > min_gap]
    if not slopes:
        return None
    slope = statistics.median(slopes)
    if slope <= MIN_COST_PER_SAMPLE_S:  # noise made the line flat or falling: no fixed cost can be told apart
        return proportional_fit(points)
    intercept = statistics.median(t - slope * b for b, t in points)
    if intercept < 0:
        return proportional_fit(points)
    return AffineCost(intercept, slope)


def proportional_fit(points: Sequence[tuple[float, float]]) -> AffineCost | None:
    """t = c b through the origin (no fixed cost), c = the median of t / b; None without a point with b > 0."""
    ratios = [t / b for b, t in points if b > 0]
    if not ratios:
        return None
    return AffineCost(0.0, max(statistics.median(ratios), MIN_COST_PER_SAMPLE_S))


def residual_spread_s(points: Sequence[tuple[float, float]], line: AffineCost) -> float:
    """1.4826 x the median absolute residual: a standard deviation that ignores outliers."""
    if not points:
        return 0.0
    return 1.4826 * statistics.median(abs(t - line.time_s(b)) for b, t in points)


def median_rows(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """statistics.median of each row's valid entries, bit for bit: the middle one of the sorted entries, or (a + b) / 2
    of the two middle ones; nan for a row without any."""
    ordered = np.sort(np.where(valid, values, np.nan), axis=1)   # nan sorts last
    count = valid.sum(axis=1)
    rows = np.arange(len(ordered))
    upper = ordered[rows, np.minimum(count // 2, ordered.shape[1] - 1)]
    lower = ordered[rows, np.maximum(count - 1, 0) // 2]
    return np.where(count % 2 == 1, upper, (lower + upper) / 2)


@functools.lru_cache(maxsize=8)
def _pairs(columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices (i, j), i < j, of every pair of points in a window of `columns` points."""
    return np.triu_indices(columns, k=1)


def fit_affine_rows(batch: np.ndarray, seconds: np.ndarray, measured: np.ndarray,
                    min_gap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fit_affine on every row's measured points, min_gap (>= 0) per row: (a_s, c_s, fitted), a_s and c_s meaningful
    where fitted. Slopes are computed only for rows with a pair of points more than min_gap apart."""
    count = len(batch)
    fixed_s, per_sample_s, fitted = np.zeros(count), np.zeros(count), np.zeros(count, dtype=bool)
    low = np.where(measured, batch, np.inf).min(axis=1, initial=np.inf)
    high = np.where(measured, batch, -np.inf).max(axis=1, initial=-np.inf)
    with np.errstate(invalid="ignore"):
        paired = np.flatnonzero(high - low > min_gap)   # some pair is far enough apart iff the widest is
    if paired.size == 0:
        return fixed_s, per_sample_s, fitted
    b, t, m = batch[paired], seconds[paired], measured[paired]
    first, second = _pairs(batch.shape[1])   # every pair's slope (t_j - t_i) / (b_j - b_i), where both are measured
    gaps = np.take(b, second, axis=1) - np.take(b, first, axis=1)
    valid = np.take(m, first, axis=1) & np.take(m, second, axis=1) & (np.abs(gaps) > min_gap[paired, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = (np.take(t, second, axis=1) - np.take(t, first, axis=1)) / gaps
    slope = median_rows(slopes, valid)
    intercept = median_rows(t - slope[:, None] * b, m)
    affine = ~(slope <= MIN_COST_PER_SAMPLE_S) & ~(intercept < 0)
    fixed_s[paired], per_sample_s[paired], fitted[paired] = np.where(affine, intercept, 0.0), slope, True
    fallback = paired[~affine]   # a flat, falling or negative-intercept line: t = c b through the origin instead
    if fallback.size:
        ratio_c, ratio_ok = proportional_fit_rows(batch[fallback], seconds[fallback], measured[fallback])
        per_sample_s[fallback], fitted[fallback] = ratio_c, ratio_ok
    return fixed_s, per_sample_s, fitted


def proportional_fit_rows(batch: np.ndarray, seconds: np.ndarray,
                          measured: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """proportional_fit on every row's measured points: (c_s, fitted); a_s is 0 where fitted."""
    usable = measured & (batch > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = median_rows(seconds / batch, usable)
    return np.where(MIN_COST_PER_SAMPLE_S > ratio, MIN_COST_PER_SAMPLE_S, ratio), usable.any(axis=1)


def residual_spread_rows(batch: np.ndarray, seconds: np.ndarray, measured: np.ndarray, fixed_s: np.ndarray,
                         per_sample_s: np.ndarray) -> np.ndarray:
    """residual_spread_s of every row's measured points around its line (0.0 for a row without any)."""
    residuals = np.abs(seconds - (fixed_s[:, None] + per_sample_s[:, None] * batch))
    return np.where(measured.any(axis=1), 1.4826 * median_rows(residuals, measured), 0.0)


def predicted_step_s(split: Sequence[int], lines: Sequence[AffineCost]) -> float:
    """The slowest rank's predicted compute time for this split."""
    return max(line.time_s(b) for b, line in zip(split, lines))


def _continuous_level(total: int, fixed_s: np.ndarray, per_sample_s: np.ndarray, low: int, high: float) -> float:
    """The T with sum_i clamp((T - a_i) / c_i, low, high) = total (water-filling over sorted breakpoints)."""
    # Each rank's b_i(T) is piecewise linear in T: flat at `low` until T = t_i(low), rising with slope 1 / c_i,
    # flat at `high` from T = t_i(high). Walk the breakpoints in order, keeping the sum's slope and value: event k
    # starts at level_k = point_{k-1} with slope_k = change_0 + ... + change_{k-1} and value_k = low n + the
    # increments slope_j (point_j - level_j) before it, both sums taken left to right (np.cumsum is sequential, as
    # the loop over events this replaces was); the walk stops at the first event whose value would reach `total`.
    points, changes = fixed_s + per_sample_s * low, 1.0 / per_sample_s
    if high < math.inf:
        points, changes = np.concatenate([points, fixed_s + per_sample_s * high]), np.concatenate([changes, -changes])
    order = np.lexsort((changes, points))   # by point, then change: the order of sorted (point, change) tuples
    points, changes = points[order], changes[order]
    levels = np.concatenate([points[:1], points[:-1]])
    slopes = np.concatenate([[0.0], np.cumsum(changes)])          # slopes[k] = slope_k, one past the last event
    increments = slopes[:-1] * (points - levels)
    values = np.cumsum(np.concatenate([[float(low * len(fixed_s))], increments]))   # values[k] = value_k
    reached = np.flatnonzero((slopes[:-1] > 0) & (values[1:] >= total))
    if reached.size:
        k = reached[0]
        return float(levels[k] + (total - values[k]) / slopes[k])
    level, value, slope = float(points[-1]), float(values[-1]), float(slopes[-1])
    return level + (total - value) / slope if slope > 0 else level


def move_units(sizes: np.ndarray | list[int], units: int, step: int, key: Callable, params: Sequence,
               is_open: Callable, monotone: bool = True) -> np.ndarray | list[int]:
    """`units` times: the open rank with the smallest key(*params_i, size_i) (ties to the lower rank) moves its size by
    `step` (+1 or -1). Sizes and params as lists (for a few ranks: a heap of (key, rank) with re-push) or as arrays.

    With arrays, when a rank's key never falls as it moves (`monotone`), those choices are the `units` smallest
    (key, rank) among every rank's next moves: they are taken at once from each rank's next `rounds` moves, sorted,
    provided no rank that would take all of its `rounds` could take one more before the last one chosen (else twice
    the rounds, and past a few rounds per unit the heap).
    """
    if isinstance(sizes, list):
        return _heap_moves(sizes, units, step, key, params, is_open)
    candidates = np.flatnonzero(is_open(sizes))
    rounds, budget = 1, 4 * (units + sizes.size) + 64   # candidate moves sorted at most, else the heap
    while monotone and 0 < units and 0 < candidates.size and rounds * candidates.size <= budget:
        start = sizes[candidates][:, None] + step * np.arange(rounds)   # each candidate's size before each move
        keys = key(*(values[candidates][:, None] for values in params), start)
        usable = is_open(start).ravel()   # open before the move: a prefix of each candidate's rounds
        moves = np.flatnonzero(usable)
        if moves.size >= units:
            chosen = moves[np.argsort(keys.ravel()[moves], kind="stable")[:units]]   # ties: lower rank, then round
            taken = np.bincount(chosen // rounds, minlength=candidates.size)
            last_rank, last_key = candidates[chosen[-1] // rounds], keys.ravel()[chosen[-1]]
            full = np.flatnonzero(taken == rounds)
            after = sizes[candidates[full]] + step * rounds
            next_keys = key(*(values[candidates[full]] for values in params), after)
            sooner = is_open(after) & ((next_keys < last_key) | ((next_keys == last_key) &
                                                                 (candidates[full] < last_rank)))
            if not sooner.any():
                sizes = sizes.copy()
                sizes[candidates] += step * taken
                return sizes
        rounds *= 2
    return np.array(_heap_moves(sizes.tolist(), units, step, key, [values.tolist() for values in params], is_open),
                    dtype=np.int64)


def _heap_moves(sizes: list[int], units: int, step: int, key: Callable, params: Sequence[list],
                is_open: Callable) -> list[int]:
    moved = list(sizes)
    heap = [(key(*(values[i] for values in params), size), i) for i, size in enumerate(moved) if is_open(size)]
    heapq.heapify(heap)
    for _ in range(units):
        i = heapq.heappop(heap)[1]
        moved[i] += step
        if is_open(moved[i]):
            heapq.heappush(heap, (key(*(values[i] for values in params), moved[i]), i))
    return moved


def min_max_split(total: int, lines: Sequence[AffineCost], *, min_size: int = 1,
                  max_size: int | None = None) -> list[int]:
    """Integers in [min_size, max_size] summing to `total` that minimise max_i t_i(b_i) (see the module docstring)."""
    fixed_s = np.array([line.a_s for line in lines], dtype=np.float64)
    per_sample_s = np.array([line.c_s for line in lines], dtype=np.float64)
    return min_max_split_rows(total, fixed_s, per_sample_s, min_size=min_size, max_size=max_size).tolist()


def min_max_split_rows(total: int, fixed_s: np.ndarray, per_sample_s: np.ndarray, *, min_size: int = 1,
                       max_size: int | None = None) -> np.ndarray:
    """min_max_split of the lines t_i(b) = fixed_s[i] + per_sample_s[i] b, as an int64 array."""
    count = len(fixed_s)
    high = math.inf if max_size is None else max_size
    if total < count * min_size or total > count * high:
        raise ValueError(f"cannot split {total} into {count} sizes within [{min_size}, {max_size}]")
    if (per_sample_s == 0).any():
        raise ZeroDivisionError("float division by zero")   # 1 / c_i, as the scalar code raised
    level = _continuous_level(total, fixed_s, per_sample_s, min_size, high)
    shares = (level - fixed_s) / per_sample_s + 1e-9
    if not np.isfinite(shares).all():
        [math.floor(share) for share in shares.tolist()]    # raises what math.floor raises on nan or inf
    sizes = np.floor(shares)
    sizes = np.where(min_size > sizes, min_size, sizes)
    sizes = np.where(high < sizes, high, sizes).astype(np.int64)
    monotone = bool((per_sample_s > 0).all())
    excess = int(sizes.sum()) - total
    if excess > 0:  # rounding error at the breakpoints: give back from the slowest (max time, ties to the lower rank)
        sizes = move_units(sizes, excess, -1, lambda a, c, size: -(a + c * size), (fixed_s, per_sample_s),
                           lambda size: size > min_size, monotone)
    missing = total - int(sizes.sum())
    if missing > 0:  # the units left, each to the rank whose time after taking it is smallest
        sizes = move_units(sizes, missing, +1, lambda a, c, size: a + c * (size + 1), (fixed_s, per_sample_s),
                           lambda size: size < high, monotone)
    return sizes


def expected_step_s(split: Sequence[int], lines: Sequence[AffineCost], residuals: Sequence[Sequence[float]]) -> float:
    """The mean over past steps of the slowest rank's time: max_i (t_i(b_i) + residual of rank i in that step)."""
    if not residuals:
        return predicted_step_s(split, lines)
    times = [line.time_s(b) for b, line in zip(split, lines)]
    return sum(max(t + r for t, r in zip(times, row)) for row in residuals) / len(residuals)
