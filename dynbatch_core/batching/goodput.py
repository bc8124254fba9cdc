"""The goodput rule: choose the global batch that maximises throughput x statistical efficiency (Pollux, OSDI'21),
from the measured gradient noise scale (noise_scale.py) and the run's own step times.

    smoother = NoiseScaleSmoother()         # the caller's: it feeds every step's estimate (and AdaScale reads it)
    rule = GoodputRule(initial_batch=64, min_batch=2, max_batch=1024, decide_every=50, smoother=smoother)
    smoother.update(NoiseEstimate(...)); rule.observe([40, 24], [0.21, 0.20])   # after every step: split, compute_s
    batch, steps = rule.decide(64)          # when due: the B for the next `steps` steps

  efficiency   E(B) = (B_simple + B_0) / (B_simple + B): the progress a sample buys at B relative to the initial
               batch B_0 (McCandlish et al. 2018); B_simple is the noise scale smoothed over ~50 steps (a
               single step's estimate is mostly noise once B_simple is far above the batch).
  throughput   T(B) = B / t(B). Each rank's compute time is fitted as t_i(b) = a_i + c_i b (Theil-Sen,
               cost_model.fit_affine) to its recent (b_i, compute_s) points: a fixed cost per step plus a cost per
               sample, so a larger B pays off exactly as far as the fixed cost is amortised. t(B) is the slowest
               rank's time under the best split of B over those lines (cost_model.min_max_split), as a balancer
               would split it: a slow rank enters the choice, while the splits a balancer is still moving through
               (after a change of B) do not. Until every rank has points at two sizes, one line through the
               steps' (B, slowest compute_s) stands in. (The model balancer fits the same lines with the same
               cost_model.fit_affine, but over its last 24 steps, which mostly hold one B: its lines decide the
               split at that B, while these must price B/2 and 2B, so they keep points across 12 sizes.) What a step takes beyond its slowest rank's compute (the
               reduction, the optimizer step; measured on rank 0, median of the recent steps) is added as a
               fixed cost: on a CPU it is much of what a small batch wastes.
  candidates   B / FACTOR, B, B x FACTOR (FACTOR = 2), within [min_batch, max_batch].
  explore      a candidate outside the range of batch sizes seen so far would be priced by extrapolation, which an
               affine fit around one B cannot do (on a CPU a 2x larger B is far from 2x cheaper per sample): it is
               tried instead, for EXPLORE_STEPS steps, once; then the fit covers it. Only a candidate that could
               win is tried: its most optimistic price (a larger B takes no less time than the current one, a
               smaller B no less per sample) must beat the best measured candidate by the threshold, and of
               several such the most promising goes first. So a halving that the efficiency gain alone cannot
               pay for is never visited.
  move         to the best candidate only when its predicted goodput beats the current B's by more than
               `threshold` (default 5 %): no flapping between two batch sizes that are as good.
Decisions are made by rank 0 and broadcast (agreement.decided_by_rank0) like every other.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

from .cost_model import AffineCost, fit_affine, min_max_split, predicted_step_s
from .noise_scale import NoiseScaleSmoother

FACTOR = 2
EXPLORE_STEPS = 4
TIMES_PER_BATCH = 16   # the most recent step times kept per batch size: a B tried once stays priced
SIZES_PER_RANK = 12    # per rank, the batch sizes most recently seen (a balancer moving b leaves many behind)
OVERHEADS_KEPT = 64    # the most recent per-step costs beyond compute


class GoodputRule:
    def __init__(self, *, initial_batch: int, min_batch: int, max_batch: int, decide_every: int = 50,
                 threshold: float = 0.05, smoother: NoiseScaleSmoother | None = None):
        """smoother: the smoothed noise scale the rule decides from; its owner feeds it every step's estimate (the
        training loop's, which AdaScale reads too). Default: a new one, for the caller to feed."""
        if not threshold >= 0:
            raise ValueError(f"goodput threshold must be >= 0, got {threshold}")
        if decide_every < 1:
            raise ValueError(f"decide_every must be >= 1, got {decide_every}")
        self.decide_every = decide_every
        self.initial_batch, self.min_batch, self.max_batch = initial_batch, min_batch, max_batch
        self.threshold = threshold
        self.smoother = smoother if smoother is not None else NoiseScaleSmoother()
        self.times: dict[int, list[float]] = {}   # global batch -> its most recent slowest-rank step times
        self.rank_times: list[dict[int, list[float]]] = []   # per rank: its batch -> its most recent compute times
        self.overheads: list[float] = []   # recent seconds per step beyond the slowest rank's compute
        self.explored: set[int] = set()
        self.exploring: int | None = None   # while a candidate is tried: the B to return to

    def observe(self, rank_batches: Sequence[int], compute_s: Sequence[float], overhead_s: float = 0.0) -> None:
        """One step: each rank's batch and compute seconds, and what the step took beyond the slowest rank's
        compute (its noise estimate goes to the smoother)."""
        self.overheads = [*self.overheads[1 - OVERHEADS_KEPT:], float(overhead_s)]
        if len(self.rank_times) != len(rank_batches):   # first step, or another world size: start over
            self.rank_times = [{} for _ in rank_batches]
        for times, batch, seconds in zip(self.rank_times, rank_batches, compute_s):
            _remember(times, int(batch), float(seconds))
            times[int(batch)] = times.pop(int(batch))   # most recently seen last
            while len(times) > SIZES_PER_RANK:
                del times[next(iter(times))]
        global_batch = int(sum(rank_batches))
        _remember(self.times, global_batch, float(max(compute_s)))
        self.explored.add(global_batch)

    @property
    def noise_scale(self) -> float:
        return self.smoother.noise_scale

    def efficiency(self, batch: int) -> float:
        noise = self.noise_scale
        if noise == math.inf:   # pure noise: a sample buys the same progress at any B (linear scaling holds)
            return 1.0
        return (noise + self.initial_batch) / (noise + batch)

    def rank_lines(self) -> list[AffineCost] | None:
        lines = [fit_affine([(b, t) for b, times in rank.items() for t in times]) for rank in self.rank_times]
        return lines if lines and all(line is not None for line in lines) else None

    def step_time_s(self, batch: int, lines: list[AffineCost] | None = None) -> float | None:
        """The predicted step time at global batch `batch` (None: nothing to predict from yet); `lines`: the
        rank_lines() already fitted."""
        lines = lines or self.rank_lines()
        overhead_s = statistics.median(self.overheads) if self.overheads else 0.0
        if lines is not None and batch >= len(lines):
            return predicted_step_s(min_max_split(batch, lines), lines) + overhead_s
        line = fit_affine([(b, seconds) for b, times in self.times.items() for seconds in times])
        if line is not None:
            return line.time_s(batch) + overhead_s
        measured = self.times.get(batch)   # one size seen so far: its own times
        return statistics.median(measured) + overhead_s if measured else None

    def goodput(self, batch: int, lines: list[AffineCost] | None = None) -> float:
        """Samples of progress per second at `batch` (relative to B_0's efficiency)."""
        return self.efficiency(batch) * batch / self.step_time_s(batch, lines)

    def candidates(self, current: int) -> list[int]:
        found = {min(max(int(round(b)), self.min_batch), self.max_batch)
                 for b in (current / FACTOR, current, current * FACTOR)}
        return sorted(found)

    def decide(self, current: int) -> tuple[int, int]:
        """(the global batch for the next steps, how many steps until the next decision)."""
        if self.exploring is not None:   # the tried B has had its EXPLORE_STEPS steps: back to where it was
            current, self.exploring = self.exploring, None
        if not self.noise_scale > 0:   # not measured yet (NaN), or the trace estimate is not positive
            return current, self.decide_every
        lines = self.rank_lines()
        if self.step_time_s(current, lines) is None:
            return current, self.decide_every
        priced = [b for b in self.candidates(current) if b in self.explored] or [current]
        best = max(priced, key=lambda b: self.goodput(b, lines))
        unseen = [b for b in self.candidates(current) if b not in self.explored]
        if unseen:   # price it by measuring, not by extrapolating, if it could win at all
            bound = {b: self.optimistic_goodput(b, current, lines) for b in unseen}
            hopeful = max(unseen, key=bound.get)
            if bound[hopeful] > (1 + self.threshold) * self.goodput(best, lines):
                self.exploring = current
                return hopeful, EXPLORE_STEPS
        if self.goodput(best, lines) > (1 + self.threshold) * self.goodput(current, lines):
            return best, self.decide_every
        return current, self.decide_every

    def optimistic_goodput(self, batch: int, current: int, lines: list[AffineCost] | None = None) -> float:
        """An upper bound on the goodput of an unmeasured `batch` from the current B's step time: a larger B takes
        at least as long per step, a smaller one at least as long per sample."""
        current_s = self.step_time_s(current, lines)
        step_s = current_s if batch >= current else current_s * batch / current
        return self.efficiency(batch) * batch / step_s

    def state_dict(self) -> dict:
        return {"times": _listed(self.times),
                "rank_times": [_listed(rank) for rank in self.rank_times], "overheads": list(self.overheads),
                "explored": sorted(self.explored), "exploring": self.exploring or 0}

    def load_state_dict(self, state: dict, *, same_ranks: bool = True) -> None:
        """same_ranks=False (resumed on another world size): the per-rank times are dropped, the rest kept. The
        smoother is its owner's to restore (checkpoints before it was shared held a copy here: ignored)."""
        self.times = _keyed(state["times"])
        self.rank_times = [_keyed(rank) for rank in state.get("rank_times", [])] if same_ranks else []
        self.overheads = [float(t) for t in state.get("overheads", [])]
        self.explored = set(int(b) for b in state["explored"])
        self.exploring = int(state["exploring"]) or None


def _remember(times: dict[int, list[float]], batch: int, seconds: float) -> None:
    recent = times.setdefault(batch, [])
    recent.append(seconds)
    del recent[:-TIMES_PER_BATCH]


def _listed(times: dict[int, list[float]]) -> list:
    return [[batch, list(values)] for batch, values in sorted(times.items())]


def _keyed(listed: list) -> dict[int, list[float]]:
    return {int(batch): [float(t) for t in values] for batch, values in listed}
