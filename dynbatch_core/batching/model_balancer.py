"""The `model` balancer: per-rank affine step-time fits t_i(b) = a_i + c_i b (cost_model.py) and the split that
minimises the slowest rank's expected time, held until a new split beats it by more than the fits' noise.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from .balancer_base import Balancer
from .cost_model import AffineCost, expected_step_s, fit_affine, min_max_split, proportional_fit, residual_spread_s


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
