"""The frozen pre-rewrite implementation of the balancers, kept to prove that the rewrite is bit-identical.

This is dynbatch_core/batching/{cost_model,balancer_base,model_balancer,balancers}.py as they were at commit 31b8dcb
(before the O(n log n) rewrite of every balancer decision), verbatim apart from the imports between them and a
plain build_balancer without the registry. tests/test_decision_scaling.py drives these and the package's balancers
with the same inputs and asserts equal decisions and equal state; benchmarks/decision_cost.py times both.
Do not edit or "fix" anything here: its only job is to stay what the code was.

    import reference_balancers as reference                  # tests/ is on sys.path under pytest
    reference.build_balancer("pid", 1024).split(32 * 1024 + 7)
    reference.largest_remainder_split(10, [1, 1, 1])          # -> [4, 3, 3], O(n^2) in the rounding repair
"""
from __future__ import annotations

import heapq
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

# --- dynbatch_core/batching/cost_model.py at the commit before the rewrite --------------------------------------------

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


# --- dynbatch_core/batching/balancer_base.py at the commit before the rewrite -----------------------------------------

def largest_remainder_split(total: int, weights: Sequence[float], *, min_size: int = 1,
                            max_size: int | None = None) -> list[int]:
    """Integers proportional to `weights` that sum to `total`, each in [min_size, max_size].

    Ties go to the lower rank, so the result is a pure function of the inputs.
    """
    count = len(weights)
    if count == 0 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    upper = math.inf if max_size is None else max_size
    if total < count * min_size or total > count * upper:
        raise ValueError(f"cannot split {total} into {count} sizes within [{min_size}, {max_size}]")
    weight_sum = float(sum(weights))
    quotas = [total * w / weight_sum for w in weights]
    sizes = [int(min(max(math.floor(q), min_size), upper)) for q in quotas]
    while sum(sizes) < total:
        grow = max((i for i in range(count) if sizes[i] < upper), key=lambda i: (quotas[i] - sizes[i], -i))
        sizes[grow] += 1
    while sum(sizes) > total:
        shrink = min((i for i in range(count) if sizes[i] > min_size), key=lambda i: (quotas[i] - sizes[i], i))
        sizes[shrink] -= 1
    return sizes


class Balancer:
    """Base class: an equal split, no state. Subclasses override `weights` and, if they learn, `observe`."""

    name = "equal"
    options: tuple[str, ...] = ()  # the build_balancer options this balancer takes

    def __init__(self, world_size: int, *, min_rank_batch: int = 1, max_rank_batch: int | None = None):
        self.world_size = world_size
        self.min_rank_batch = min_rank_batch
        self.max_rank_batch = max_rank_batch

    def weights(self) -> list[float]:
        return [1.0] * self.world_size

    def split(self, global_batch: int) -> list[int]:
        return largest_remainder_split(global_batch, self.weights(), min_size=self.min_rank_batch,
                                       max_size=self.max_rank_batch)

    def observe(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        """One step's all-gathered measurements (seconds of compute per rank, samples per rank)."""

    def end_epoch(self) -> None:
        """Called on every rank after the last step of an epoch."""

    def cost_line(self, rank: int) -> AffineCost | None:
        """The fitted step-time line of `rank`, for balancers that model one."""
        return None

    def state_dict(self) -> dict:
        return {"balancer": self.name, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["balancer"], state["world_size"]) != (self.name, self.world_size):
            raise ValueError(f"balancer state is for {state['balancer']!r} on {state['world_size']} ranks, this is "
                             f"{self.name!r} on {self.world_size}")


# --- dynbatch_core/batching/model_balancer.py at the commit before the rewrite ----------------------------------------

CHANGE_STEPS = 4         # model: this many outlying steps in a row on one side mean the rank's speed changed (3 slow
                         # steps in a row came from load alone on CPU, seen once in 3 runs of [1,3]: a false change
                         # costs ~5 steps at a wrong split)
CHANGE_FLOOR = 0.15      # model: an outlier lies at least this fraction of the prediction off it
MAX_FIXED_SHARE = 0.5    # model: a line's fixed cost is at most this share of its time at the window's batch size
MIN_BATCH_SPREAD = 0.1   # model: slopes only from pairs of points whose batches differ by this share of b
WARMUP_STEPS = 2         # model: the run's first steps measure nothing (CPU, 2 ranks: 1.6x and 1.1x the steady time
                         # at the median over runs, 2.2x and 1.4x at the 90th percentile)
RESIDUAL_LIMIT = 3.0     # model: residuals count in the expected step time up to this many residual spreads


class ModelBalancer(Balancer):
    """Fit each rank's step time t_i(b) = a_i + c_i b and solve for the split (LB-BSP, Cannikin), see cost_model.py.

    After every step, rank i's (b_i, compute_s_i) joins a sliding window of its last model_window points, to which
    a Theil-Sen line is fitted (until the window's batch sizes spread: t = c b through the origin, refitted every
    step, so that its residuals measure noise rather than a stale level).
      fit       the slope from pairs of points whose batch sizes differ by >= 10 % of b (and >= 2 samples): a
                slope from sizes close together is mostly timing noise; without such a pair the last line stays.
      warm-up   the run's first two steps, and a rank's first step at a batch size it has not run before when it
                lies over 15 % above the line, measure nothing: a new shape costs 20-30 % once on CPU, and counted
                as speed it biased the line and looked like a slowdown. (Not the 4-spread gate below: right after
                a rescale that gate is too wide to tell such a step from noise.)
      change    four steps in a row whose residual lies beyond max(4 x the residual spread, 15 % of the
                prediction), on the same side, mean the rank's speed changed: its line is scaled by the new points'
                measured / predicted ratio (a slowdown multiplies both the fixed and the per-sample cost), and so
                are the times of the window's older points, which keeps the cost's shape at the new level.
      split     the exact integer min-max split of the lines (cost_model.min_max_split). No slack for a noisy
                rank: measured on [1,3] (real timing), choosing among splits that gave the noisier slow rank some
                slack ended 2-3 samples below the balanced split and lost 2-3 % of the throughput to it.
      hold      the split in use changes only when the new one's expected step time beats it by more than the
                largest residual spread over the square root of the window (the noise of that mean; hysteresis
                in the model's own units), so timing noise does not move it. The expected step time of a split
                is the mean over the window's steps of max_i (t_i(b_i) + that step's residual of rank i): a step
                lasts as long as its slowest rank, and contention between ranks is kept as measured.
      spread    while some rank's line is not yet affine (its points hold one batch size), every other step moves one
                sample between two ranks chosen from the step count (never a random draw): every rank and every
                resumed run do the same.
    `lines` and `cost_line(rank)` expose the model (steps.csv's model_a_s, model_c_s). The goodput rule fits its
    own lines (goodput.py says why).
    """

    name = "model"
    options = ("model_window",)

    def __init__(self, world_size: int, *, model_window: int = 24, **bounds):
        super().__init__(world_size, **bounds)
        if model_window < 3:
            raise ValueError(f"model balancer: model_window={model_window} must be >= 3 steps")
        self.model_window = model_window
        # (batch, seconds) per step, seconds None where the step measured nothing (a first step at a new size)
        self.points: list[list[tuple[float, float | None]]] = [[] for _ in range(world_size)]
        self.lines: list[AffineCost | None] = [None] * world_size
        self.affine = [False] * world_size       # the line came from two or more batch sizes
        self.spreads = [0.0] * world_size        # residual spread of each rank's window around its line, seconds
        self.outliers = [0] * world_size         # consecutive same-side outlying steps (+ slower, - faster)
        self.sizes_run: list[set[float]] = [set() for _ in range(world_size)]   # batch sizes each rank has run
        self.steps = 0
        self.held: list[int] | None = None       # the split in use

    def observe(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        self.steps += 1
        if self.steps <= WARMUP_STEPS:
            return
        for rank, (seconds, batch) in enumerate(zip(compute_s, rank_batches)):
            self._observe_rank(rank, float(batch), float(seconds))

    def _outlying(self, rank: int, batch: float, seconds: float) -> int:
        """+1 (-1) when `seconds` lies beyond max(4 residual spreads, 15 %) above (below) the rank's line, else 0."""
        predicted = self.lines[rank].time_s(batch)
        residual = seconds - predicted
        if abs(residual) <= max(4 * self.spreads[rank], CHANGE_FLOOR * predicted):
            return 0
        return 1 if residual > 0 else -1

    def _observe_rank(self, rank: int, batch: float, seconds: float) -> None:
        window, line = self.points[rank], self.lines[rank]
        first_at_size = batch not in self.sizes_run[rank]
        self.sizes_run[rank].add(batch)
        # The first step at a batch size the rank has not run yet is slow (measured 20-30 % on CPU: kernels and
        # buffers for a new shape): it says nothing of the rank's speed, and keeps only its place in the window,
        # which stays step-aligned with the other ranks'.
        transient = first_at_size and line is not None and seconds > (1 + CHANGE_FLOOR) * line.time_s(batch)
        window.append((batch, None if transient else seconds))
        del window[:-self.model_window]
        if transient:
            return
        if line is not None and len(window) > CHANGE_STEPS:
            side = self._outlying(rank, batch, seconds)
            if side:
                self.outliers[rank] = self.outliers[rank] + side if self.outliers[rank] * side > 0 else side
            else:
                self.outliers[rank] = 0
            if abs(self.outliers[rank]) >= CHANGE_STEPS:  # the rank's speed changed: rescale line and history
                recent = [i for i, (_, t) in enumerate(window) if t is not None][-CHANGE_STEPS:]
                ratio = statistics.median(window[i][1] / max(line.time_s(window[i][0]), 1e-12) for i in recent)
                # Older points keep their batch sizes and move to the new speed: the window keeps the shape of the
                # cost (a fit from a few new points alone would be mostly noise) at the level just measured.
                cut = recent[0]
                window[:cut] = [(b, None if t is None else t * ratio) for b, t in window[:cut]]
                self.lines[rank], self.outliers[rank] = line.scaled(ratio), 0
                self.spreads[rank] = residual_spread_s(_measured(window), self.lines[rank])
                return
        window = _measured(window)
        if not window:  # only steps that measured nothing (first steps at new sizes) are left in the window
            return
        # A slope from batch sizes close together is mostly timing noise: fit on pairs of points far enough apart,
        # and without such a pair keep the last line fitted on them.
        median_batch = statistics.median(b for b, _ in window)
        fitted = fit_affine(window, min_gap=max(2.0, MIN_BATCH_SPREAD * median_batch) - 1e-9)
        if fitted is not None:
            self.lines[rank], self.affine[rank] = _at_most_half_fixed(fitted, median_batch), True
        elif not self.affine[rank]:  # no line from a spread yet: follow the level of the window's own points
            self.lines[rank] = proportional_fit(window)
        if self.lines[rank] is not None:
            self.spreads[rank] = residual_spread_s(window, self.lines[rank])

    def residuals(self) -> list[list[float]]:
        """Per step of the window, every rank's measured minus predicted seconds (the windows are step-aligned),
        each limited to RESIDUAL_LIMIT residual spreads of its rank: the first step's warm-up, or a step in which
        the machine descheduled a rank, says nothing about the next step and must not decide the split."""
        columns = []
        for window, line, spread in zip(self.points, self.lines, self.spreads):
            limit = RESIDUAL_LIMIT * spread
            columns.append([0.0 if t is None else min(max(t - line.time_s(b), -limit), limit) for b, t in window])
        return [list(row) for row in zip(*columns)]

    def cost_line(self, rank: int) -> AffineCost | None:
        return self.lines[rank]

    def split(self, global_batch: int) -> list[int]:
        if any(line is None for line in self.lines):
            return super().split(global_batch)
        residuals = self.residuals()
        best = min_max_split(global_batch, self.lines, min_size=self.min_rank_batch, max_size=self.max_rank_batch)
        held = self.held
        # Hysteresis: the expected step time is a mean over the window, so its noise is the residual spread over
        # the square root of the window's length.
        margin = max(self.spreads) / math.sqrt(max(1, len(residuals)))
        if held is None or sum(held) != global_batch or _beats(expected_step_s(best, self.lines, residuals),
                                                               expected_step_s(held, self.lines, residuals), margin):
            self.held = held = best
        if all(self.affine):
            return list(held)
        return self._spread(held)

    def _spread(self, split: list[int]) -> list[int]:
        """Every other step, one sample from rank j to rank i, (i, j) from the step count."""
        split = list(split)
        if self.steps % 2 == 0 or self.world_size < 2:
            return split
        receiver = (self.steps // 2) % self.world_size
        giver = (receiver + 1) % self.world_size
        upper = math.inf if self.max_rank_batch is None else self.max_rank_batch
        if split[giver] > self.min_rank_batch and split[receiver] < upper:
            split[giver] -= 1
            split[receiver] += 1
        return split

    def state_dict(self) -> dict:
        return {**super().state_dict(), "points": [[list(p) for p in window] for window in self.points],
                "lines": [[] if line is None else [line.a_s, line.c_s] for line in self.lines],
                "affine": list(self.affine), "spreads": list(self.spreads), "outliers": list(self.outliers),
                "steps": self.steps, "held": [] if self.held is None else list(self.held),
                "sizes_run": [sorted(sizes) for sizes in self.sizes_run]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.points = [[(float(b), None if t is None else float(t)) for b, t in window] for window in state["points"]]
        self.lines = [AffineCost(*line) if line else None for line in state["lines"]]
        self.affine, self.spreads = list(state["affine"]), list(state["spreads"])
        self.outliers, self.steps = list(state["outliers"]), state["steps"]
        self.held = list(state["held"]) or None
        self.sizes_run = [set(map(float, sizes)) for sizes in state.get("sizes_run", [[]] * self.world_size)]


def _at_most_half_fixed(line: AffineCost, batch: float) -> AffineCost:
    """The line, or where its fixed cost is over MAX_FIXED_SHARE of its time at `batch` (the window's median), the
    line through that point with that share. A slope flattened by load (0.25 ms/sample where 1.1 was true, in a
    [1,3] run under load) made moving samples to that rank look free, and a split 6 samples off balance was held."""
    seconds = line.time_s(batch)
    if line.a_s <= MAX_FIXED_SHARE * seconds:
        return line
    return AffineCost(MAX_FIXED_SHARE * seconds, (1 - MAX_FIXED_SHARE) * seconds / batch)


def _measured(window: list[tuple[float, float | None]]) -> list[tuple[float, float]]:
    return [(b, t) for b, t in window if t is not None]


def _beats(new_s: float, held_s: float, margin_s: float) -> bool:
    """Better by more than the margin; without noise (margin 0) a tie also goes to the new, exact split."""
    return new_s < held_s - margin_s if margin_s > 0 else new_s <= held_s


# --- dynbatch_core/batching/balancers.py at the commit before the rewrite ---------------------------------------------

class EqualBalancer(Balancer):
    """b_i = B / n, the remainder to the lowest ranks."""

    name = "equal"


class WeightsBalancer(Balancer):
    """Fixed shares given by the user (e.g. --rank-weights 3,13), as a DBS-style static split."""

    name = "weights"
    options = ("rank_weights",)

    def __init__(self, world_size: int, *, rank_weights: Sequence[float] | None = None, **bounds):
        super().__init__(world_size, **bounds)
        rank_weights = [1.0] * world_size if rank_weights is None else rank_weights
        if len(rank_weights) != world_size:
            raise ValueError(f"rank_weights needs {world_size} entries, got {len(rank_weights)}")
        self.rank_weights = [float(w) for w in rank_weights]

    def weights(self) -> list[float]:
        return list(self.rank_weights)


class _Window:
    """Per-rank sums of samples and compute seconds over some steps."""

    def __init__(self, world_size: int):
        self.samples = [0.0] * world_size
        self.compute_s = [0.0] * world_size
        self.steps = 0

    def add(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        self.samples = [total + float(b) for total, b in zip(self.samples, rank_batches)]
        self.compute_s = [total + float(t) for total, t in zip(self.compute_s, compute_s)]
        self.steps += 1

    def throughput(self) -> list[float] | None:
        """Samples per second of each rank, or None while some rank has no measurement."""
        if any(b <= 0 or t <= 0 for b, t in zip(self.samples, self.compute_s)):
            return None
        return [b / t for b, t in zip(self.samples, self.compute_s)]

    def state_dict(self) -> dict:
        return {"samples": list(self.samples), "compute_s": list(self.compute_s), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.samples, self.compute_s = list(state["samples"]), list(state["compute_s"])
        self.steps = state["steps"]


def _normalised(values: Sequence[float]) -> list[float]:
    total = float(sum(values))
    return [v / total for v in values]


class DBSBalancer(Balancer):
    """Ye et al., "DBS: Dynamic Batch Size for Distributed DNN Training" (2020): at the end of every epoch

        share_i = x_i / sum_j x_j,   x_i = sum of rank i's samples / sum of its compute seconds over that epoch,

    used for the whole next epoch. The first epoch is split equally; an epoch in which some rank measured nothing
    (no samples or no time) leaves the shares as they were.
    """

    name = "dbs"

    def __init__(self, world_size: int, **bounds):
        super().__init__(world_size, **bounds)
        self.shares = [1.0 / world_size] * world_size
        self.epoch_window = _Window(world_size)

    def weights(self) -> list[float]:
        return list(self.shares)

    def observe(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        self.epoch_window.add(compute_s, rank_batches)

    def end_epoch(self) -> None:
        throughput = self.epoch_window.throughput()
        if throughput is not None:
            self.shares = _normalised(throughput)
        self.epoch_window = _Window(self.world_size)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "shares": list(self.shares), "epoch_window": self.epoch_window.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.shares = list(state["shares"])
        self.epoch_window.load_state_dict(state["epoch_window"])


class PIDBalancer(Balancer):
    """Tyagi & Sharma, "Taming Resource Heterogeneity In Distributed ML Training With Dynamic Batching" (2020).

    Every balance_every steps (observe() calls), from the window of steps since the last update:
      1. throughput   r_i = sum samples_i / sum compute_s_i;  x_i <- pid_ema * r_i + (1 - pid_ema) * x_i
                      (x_i = r_i at the first update); target share s*_i = x_i / sum_j x_j.
      2. dead band    T_i = rank i's mean step compute time in the window; if (max T - min T) / max T <= dead_band
                      the split is balanced to within the noise: no change, and the integral is reset (anti-windup).
      3. PI step      e_i = s*_i - s_i;  I_i <- I_i + e_i;  delta_i = pid_kp * e_i + pid_ki * I_i.
      4. cap          the whole delta is scaled down so that no |delta_i| exceeds max_change / n (and I keeps
                      its old value: a capped move does not integrate, anti-windup); then
                      s_i <- max(s_i + delta_i, 0.001 / n), normalised to sum 1.
    A share-proportional-to-throughput split is steady exactly when all ranks' step times are equal, which is also
    what the dead band measures. split(B) = largest_remainder_split(B, s) for any B. A window in which some rank
    measured nothing is dropped.
    """

    name = "pid"
    options = ("balance_every", "pid_kp", "pid_ki", "pid_ema", "dead_band", "max_change")

    def __init__(self, world_size: int, *, balance_every: int = 3, pid_kp: float = 0.6, pid_ki: float = 0.05,
                 pid_ema: float = 0.6, dead_band: float = 0.05, max_change: float = 0.25, **bounds):
        super().__init__(world_size, **bounds)
        for what, value, ok in (("balance_every", balance_every, balance_every >= 1),
                                ("pid_kp", pid_kp, pid_kp >= 0), ("pid_ki", pid_ki, pid_ki >= 0),
                                ("pid_ema", pid_ema, 0 < pid_ema <= 1), ("dead_band", dead_band, dead_band >= 0),
                                ("max_change", max_change, max_change > 0)):
            if not ok:
                raise ValueError(f"pid balancer: {what}={value} is out of range (balance_every >= 1, gains >= 0, "
                                 "0 < pid_ema <= 1, dead_band >= 0, max_change > 0)")
        self.balance_every, self.pid_kp, self.pid_ki = balance_every, pid_kp, pid_ki
        self.pid_ema, self.dead_band, self.max_change = pid_ema, dead_band, max_change
        self.shares = [1.0 / world_size] * world_size
        self.throughput: list[float] = []  # smoothed samples/s per rank; empty before the first update
        self.integral = [0.0] * world_size
        self.window = _Window(world_size)

    def weights(self) -> list[float]:
        return list(self.shares)

    def observe(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        self.window.add(compute_s, rank_batches)
        if self.window.steps >= self.balance_every:
            window, self.window = self.window, _Window(self.world_size)
            self._update(window)

    def _update(self, window: _Window) -> None:
        sample = window.throughput()
        if sample is None:
            return
        self.throughput = sample if not self.throughput else [
            self.pid_ema * new + (1 - self.pid_ema) * old for new, old in zip(sample, self.throughput)]
        step_s = [t / window.steps for t in window.compute_s]
        if (max(step_s) - min(step_s)) / max(step_s) <= self.dead_band:
            self.integral = [0.0] * self.world_size
            return
        errors = [target - share for target, share in zip(_normalised(self.throughput), self.shares)]
        integral = [total + error for total, error in zip(self.integral, errors)]
        deltas = [self.pid_kp * e + self.pid_ki * i for e, i in zip(errors, integral)]
        cap = self.max_change / self.world_size
        scale = min(1.0, cap / max(max(abs(d) for d in deltas), 1e-300))
        if scale == 1.0:  # a capped move does not integrate (anti-windup)
            self.integral = integral
        floor = 0.001 / self.world_size
        self.shares = _normalised([max(s + scale * d, floor) for s, d in zip(self.shares, deltas)])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "shares": list(self.shares), "throughput": list(self.throughput),
                "integral": list(self.integral), "window": self.window.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.shares, self.throughput = list(state["shares"]), list(state["throughput"])
        self.integral = list(state["integral"])
        self.window.load_state_dict(state["window"])


BALANCERS: dict[str, type[Balancer]] = {cls.name: cls for cls in (EqualBalancer, WeightsBalancer, DBSBalancer,
                                                                   PIDBalancer, ModelBalancer)}


def build_balancer(name: str, world_size: int, *, rank_weights: Sequence[float] | None = None,
                   min_rank_batch: int = 1, max_rank_batch: int | None = None, **options) -> Balancer:
    """The reference balancer called `name`, built like dynbatch_core's build_balancer (options it does not take
    are ignored)."""
    cls = BALANCERS[name]
    options = {**options, "rank_weights": rank_weights}
    return cls(world_size, min_rank_batch=min_rank_batch, max_rank_batch=max_rank_batch,
               **{key: value for key, value in options.items() if key in cls.options and value is not None})
