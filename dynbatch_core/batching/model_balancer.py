"""The `model` balancer: per-rank affine step-time fits t_i(b) = a_i + c_i b (cost_model.py) and the split that
minimises the slowest rank's expected time, held until a new split beats it by more than the fits' noise.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np

from .balancer_base import Balancer
from .cost_model import (AffineCost, fit_affine_rows, median_rows, min_max_split_rows, proportional_fit_rows,
                         residual_spread_rows, residual_spread_s)


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
        # The windows, all ranks at once: (ranks x steps) arrays, the oldest step first (every rank holds the same
        # steps); seconds count only where measured (not a first step at a new size). One vectorised pass per step
        # decides for every rank what the per-rank rules above say (the same floats: cost_model's *_rows).
        self._batch = np.zeros((world_size, 0))
        self._seconds = np.zeros((world_size, 0))
        self._measured = np.zeros((world_size, 0), dtype=bool)
        self._fixed_s = np.zeros(world_size)                  # each rank's line t = a + c b, where _has_line
        self._per_sample_s = np.zeros(world_size)
        self._has_line = np.zeros(world_size, dtype=bool)
        self._affine = np.zeros(world_size, dtype=bool)       # the line came from two or more batch sizes
        self._spreads = np.zeros(world_size)                  # residual spread of each rank's window, seconds
        self._outliers = np.zeros(world_size, dtype=np.int64)   # consecutive same-side outliers (+ slower, - faster)
        self.sizes_run: list[set[float]] = [set() for _ in range(world_size)]   # batch sizes each rank has run
        self._last_size = np.full(world_size, np.nan)         # the size each rank ran last (in sizes_run)
        self.steps = 0
        self.held: list[int] | None = None                    # the split in use

    @property
    def lines(self) -> list[AffineCost | None]:
        return [self.cost_line(rank) for rank in range(self.world_size)]

    def observe(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        self.steps += 1
        if self.steps <= WARMUP_STEPS:
            return
        if len(compute_s) != self.world_size or len(rank_batches) != self.world_size:
            raise ValueError(f"model balancer: one compute_s and one batch per rank ({self.world_size}), got "
                             f"{len(compute_s)} and {len(rank_batches)}")
        seconds = np.array(compute_s, dtype=np.float64)
        batch = np.array(rank_batches, dtype=np.float64)
        predicted = self._fixed_s + self._per_sample_s * batch
        # The first step at a batch size the rank has not run yet is slow (measured 20-30 % on CPU: kernels and
        # buffers for a new shape): it says nothing of the rank's speed, and keeps only its place in the window,
        # which stays step-aligned with the other ranks'.
        transient = self._first_at_size(batch) & self._has_line & (seconds > (1 + CHANGE_FLOOR) * predicted)
        kept = max(0, self._batch.shape[1] + 1 - self.model_window)
        self._batch = np.concatenate([self._batch[:, kept:], batch[:, None]], axis=1)
        self._seconds = np.concatenate([self._seconds[:, kept:], seconds[:, None]], axis=1)
        self._measured = np.concatenate([self._measured[:, kept:], ~transient[:, None]], axis=1)
        rescaled = np.zeros(self.world_size, dtype=bool)
        if self._batch.shape[1] > CHANGE_STEPS:
            checked = self._has_line & ~transient
            residual = seconds - predicted
            bound, floor = 4 * self._spreads, CHANGE_FLOOR * predicted
            outlying = ~(np.abs(residual) <= np.where(floor > bound, floor, bound))
            side = np.where(outlying, np.where(residual > 0, 1, -1), 0)
            run = np.where(side == 0, 0, np.where(self._outliers * side > 0, self._outliers + side, side))
            self._outliers = np.where(checked, run, self._outliers)
            rescaled = checked & (np.abs(self._outliers) >= CHANGE_STEPS)
            for rank in np.flatnonzero(rescaled).tolist():   # the rank's speed changed: rescale line and history
                self._rescale(rank)
        self._refit(np.flatnonzero(~transient & ~rescaled & self._measured.any(axis=1)))

    def _first_at_size(self, batch: np.ndarray) -> np.ndarray:
        """Which ranks run a batch size for the first time (and note it in sizes_run)."""
        first = np.zeros(self.world_size, dtype=bool)
        for rank in np.flatnonzero(~(batch == self._last_size)).tolist():   # the others ran it in their last step
            size = float(batch[rank])
            if size not in self.sizes_run[rank]:
                first[rank] = True
                self.sizes_run[rank].add(size)
        self._last_size = batch
        return first

    def _rescale(self, rank: int) -> None:
        """Scale the rank's line by the median measured / predicted ratio of its last CHANGE_STEPS measured steps
        (a slowdown multiplies both the fixed and the per-sample cost), and the older points' times with it."""
        window, line = self._window(rank), self.cost_line(rank)
        recent = [i for i, (_, t) in enumerate(window) if t is not None][-CHANGE_STEPS:]
        ratio = statistics.median(window[i][1] / max(line.time_s(window[i][0]), 1e-12) for i in recent)
        # Older points keep their batch sizes and move to the new speed: the window keeps the shape of the cost (a
        # fit from a few new points alone would be mostly noise) at the level just measured.
        cut = recent[0]
        window[:cut] = [(b, None if t is None else t * ratio) for b, t in window[:cut]]
        self._seconds[rank, :cut] = [0.0 if t is None else t for _, t in window[:cut]]
        line = line.scaled(ratio)
        self._fixed_s[rank], self._per_sample_s[rank], self._outliers[rank] = line.a_s, line.c_s, 0
        self._spreads[rank] = residual_spread_s(_measured(window), line)

    def _refit(self, ranks: np.ndarray) -> None:
        """Refit `ranks` (each with a measured point in its window) on their windows."""
        if ranks.size == 0:
            return
        batch, seconds, measured = self._batch[ranks], self._seconds[ranks], self._measured[ranks]
        # A slope from batch sizes close together is mostly timing noise: fit on pairs of points far enough apart,
        # and without such a pair keep the last line fitted on them.
        median_batch = median_rows(batch, measured)
        spread = MIN_BATCH_SPREAD * median_batch
        fixed_s, per_sample_s, fitted = fit_affine_rows(batch, seconds, measured,
                                                        np.where(spread > 2.0, spread, 2.0) - 1e-9)
        fixed_s, per_sample_s = _at_most_half_fixed_rows(fixed_s, per_sample_s, median_batch, fitted)
        self._fixed_s[ranks[fitted]], self._per_sample_s[ranks[fitted]] = fixed_s[fitted], per_sample_s[fitted]
        self._has_line[ranks[fitted]] = self._affine[ranks[fitted]] = True
        level = ~fitted & ~self._affine[ranks]   # no line from a spread yet: follow the level of the window's points
        if level.any():
            ratio_c, ratio_ok = proportional_fit_rows(batch[level], seconds[level], measured[level])
            self._fixed_s[ranks[level]], self._per_sample_s[ranks[level]] = 0.0, ratio_c
            self._has_line[ranks[level]] = ratio_ok
        spread_ranks = self._has_line[ranks]
        ranks = ranks[spread_ranks]
        self._spreads[ranks] = residual_spread_rows(batch[spread_ranks], seconds[spread_ranks],
                                                    measured[spread_ranks], self._fixed_s[ranks],
                                                    self._per_sample_s[ranks])

    def _window(self, rank: int) -> list[tuple[float, float | None]]:
        return [(b, t if m else None) for b, t, m in zip(self._batch[rank].tolist(), self._seconds[rank].tolist(),
                                                         self._measured[rank].tolist())]

    def _residual_rows(self) -> np.ndarray:
        """(steps x ranks): see residuals()."""
        limit = (RESIDUAL_LIMIT * self._spreads)[:, None]
        residual = self._seconds - (self._fixed_s[:, None] + self._per_sample_s[:, None] * self._batch)
        residual = np.where(-limit > residual, -limit, residual)
        return np.where(self._measured, np.where(limit < residual, limit, residual), 0.0).T

    def residuals(self) -> list[list[float]]:
        """Per step of the window, every rank's measured minus predicted seconds (the windows are step-aligned),
        each limited to RESIDUAL_LIMIT residual spreads of its rank: the first step's warm-up, or a step in which
        the machine descheduled a rank, says nothing about the next step and must not decide the split."""
        return self._residual_rows().tolist()

    def _expected_step_s(self, split: np.ndarray, residuals: np.ndarray) -> float:
        """cost_model.expected_step_s of this split on the lines and residual rows."""
        times = self._fixed_s + self._per_sample_s * split
        if len(residuals) == 0:
            return float(times.max())
        return sum((times + residuals).max(axis=1).tolist()) / len(residuals)

    def cost_line(self, rank: int) -> AffineCost | None:
        if not self._has_line[rank]:
            return None
        return AffineCost(float(self._fixed_s[rank]), float(self._per_sample_s[rank]))

    def split(self, global_batch: int) -> list[int]:
        if not self._has_line.all():
            return super().split(global_batch)
        residuals = self._residual_rows()
        best = min_max_split_rows(global_batch, self._fixed_s, self._per_sample_s, min_size=self.min_rank_batch,
                                  max_size=self.max_rank_batch)
        held = self.held
        # Hysteresis: the expected step time is a mean over the window, so its noise is the residual spread over
        # the square root of the window's length.
        margin = float(self._spreads.max()) / math.sqrt(max(1, len(residuals)))
        if held is None or sum(held) != global_batch or _beats(
                self._expected_step_s(best, residuals), self._expected_step_s(np.array(held), residuals), margin):
            self.held = held = best.tolist()
        if self._affine.all():
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
        points = [[[b, t if m else None] for b, t, m in zip(*row)]
                  for row in zip(self._batch.tolist(), self._seconds.tolist(), self._measured.tolist())]
        return {**super().state_dict(), "points": points,
                "lines": [[] if line is None else [line.a_s, line.c_s] for line in self.lines],
                "affine": self._affine.tolist(), "spreads": self._spreads.tolist(),
                "outliers": self._outliers.tolist(), "steps": self.steps,
                "held": [] if self.held is None else list(self.held),
                "sizes_run": [sorted(sizes) for sizes in self.sizes_run]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        points = state["points"]
        if len(points) != self.world_size or len({len(window) for window in points}) > 1:
            raise ValueError(f"model balancer state: every one of the {self.world_size} ranks' windows must hold "
                             f"the same steps, got {[len(window) for window in points]} points")
        steps = len(points[0]) if points else 0
        shape = (self.world_size, steps)
        self._batch = np.array([[float(b) for b, _ in window] for window in points], dtype=np.float64).reshape(shape)
        self._seconds = np.array([[0.0 if t is None else float(t) for _, t in window] for window in points],
                                 dtype=np.float64).reshape(shape)
        self._measured = np.array([[t is not None for _, t in window] for window in points],
                                  dtype=bool).reshape(shape)
        self._has_line = np.array([bool(line) for line in state["lines"]], dtype=bool)
        self._fixed_s = np.array([line[0] if line else 0.0 for line in state["lines"]], dtype=np.float64)
        self._per_sample_s = np.array([line[1] if line else 0.0 for line in state["lines"]], dtype=np.float64)
        self._affine = np.array(state["affine"], dtype=bool)
        self._spreads = np.array(state["spreads"], dtype=np.float64)
        self._outliers = np.array(state["outliers"], dtype=np.int64)
        self.steps = state["steps"]
        self.held = list(state["held"]) or None
        self.sizes_run = [set(map(float, sizes)) for sizes in state.get("sizes_run", [[]] * self.world_size)]
        self._last_size = np.full(self.world_size, np.nan)


def _at_most_half_fixed_rows(fixed_s: np.ndarray, per_sample_s: np.ndarray, batch: np.ndarray,
                             fitted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each line, or where its fixed cost is over MAX_FIXED_SHARE of its time at `batch` (the window's median), the
    line through that point with that share. A slope flattened by load (0.25 ms/sample where 1.1 was true, in a
    [1,3] run under load) made moving samples to that rank look free, and a split 6 samples off balance was held.
    Only rows where `fitted` count."""
    seconds = fixed_s + per_sample_s * batch
    kept = fixed_s <= MAX_FIXED_SHARE * seconds
    if (fitted & ~kept & (batch == 0)).any():
        raise ZeroDivisionError("float division by zero")   # as the per-rank code did: a median batch of 0
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = (1 - MAX_FIXED_SHARE) * seconds / batch
    return np.where(kept, fixed_s, MAX_FIXED_SHARE * seconds), np.where(kept, per_sample_s, moved)


def _measured(window: list[tuple[float, float | None]]) -> list[tuple[float, float]]:
    return [(b, t) for b, t in window if t is not None]


def _beats(new_s: float, held_s: float, margin_s: float) -> bool:
    """Better by more than the margin; without noise (margin 0) a tie also goes to the new, exact split."""
    return new_s < held_s - margin_s if margin_s > 0 else new_s <= held_s
