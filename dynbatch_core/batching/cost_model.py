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
integer optimum; ties go to the lower rank. O(n log n).
"""
from __future__ import annotations

import heapq
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

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


def predicted_step_s(split: Sequence[int], lines: Sequence[AffineCost]) -> float:
    """The slowest rank's predicted compute time for this split."""
    return max(line.time_s(b) for b, line in zip(split, lines))


def _continuous_level(total: int, lines: Sequence[AffineCost], low: int, high: float) -> float:
    """The T with sum_i clamp((T - a_i) / c_i, low, high) = total (water-filling over sorted breakpoints)."""
    # Each rank's b_i(T) is piecewise linear in T: flat at `low` until T = t_i(low), rising with slope 1 / c_i,
    # flat at `high` from T = t_i(high). Walk the breakpoints in order, keeping the sum's slope and value.
    events = []
    for line in lines:
        events.append((line.time_s(low), 1.0 / line.c_s))
        if high < math.inf:
            events.append((line.time_s(high), -1.0 / line.c_s))
    events.sort()
    level, value, slope = events[0][0], float(low * len(lines)), 0.0
    for point, change in events:
        if slope > 0 and value + slope * (point - level) >= total:
            break
        value += slope * (point - level)
        level, slope = point, slope + change
    return level + (total - value) / slope if slope > 0 else level


def min_max_split(total: int, lines: Sequence[AffineCost], *, min_size: int = 1,
                  max_size: int | None = None) -> list[int]:
    """Integers in [min_size, max_size] summing to `total` that minimise max_i t_i(b_i) (see the module docstring)."""
    count = len(lines)
    high = math.inf if max_size is None else max_size
    if total < count * min_size or total > count * high:
        raise ValueError(f"cannot split {total} into {count} sizes within [{min_size}, {max_size}]")
    level = _continuous_level(total, lines, min_size, high)
    sizes = [int(min(max(math.floor((level - line.a_s) / line.c_s + 1e-9), min_size), high)) for line in lines]
    while sum(sizes) > total:  # rounding error at the breakpoints: give back from the slowest
        slowest = max((i for i in range(count) if sizes[i] > min_size), key=lambda i: (lines[i].time_s(sizes[i]), -i))
        sizes[slowest] -= 1
    heap = [(line.time_s(size + 1), i) for i, (line, size) in enumerate(zip(lines, sizes)) if size < high]
    heapq.heapify(heap)
    for _ in range(total - sum(sizes)):
        _, i = heapq.heappop(heap)
        sizes[i] += 1
        if sizes[i] < high:
            heapq.heappush(heap, (lines[i].time_s(sizes[i] + 1), i))
    return sizes


def expected_step_s(split: Sequence[int], lines: Sequence[AffineCost], residuals: Sequence[Sequence[float]]) -> float:
    """The mean over past steps of the slowest rank's time: max_i (t_i(b_i) + residual of rank i in that step)."""
    if not residuals:
        return predicted_step_s(split, lines)
    times = [line.time_s(b) for b, line in zip(split, lines)]
    return sum(max(t + r for t, r in zip(times, row)) for row in residuals) / len(residuals)
