"""The goodput rule: choose the global batch that maximises throughput x statistical efficiency (Pollux, OSDI'21),
from the measured gradient noise scale (noise_scale.py) and the run's own step times.

    rule = GoodputRule(initial_batch=64, min_batch=2, max_batch=1024, decide_every=50)
    rule.observe(global_batch=64, step_s=0.21, estimate=NoiseEstimate(...))   # after every step
    batch, steps = rule.decide(64)          # when due: the B for the next `steps` steps

  efficiency   E(B) = (B_simple + B_0) / (B_simple + B): the progress a sample buys at B relative to the initial
               batch B_0 (McCandlish et al. 2018); B_simple is the noise scale smoothed over ~50 steps (a
               single step's estimate is mostly noise once B_simple is far above the batch).
  throughput   T(B) = B / t(B), with the step time t(B) = a + c B fitted (Theil-Sen, cost_model.fit_affine) to the
               recent step times of every B tried: a fixed cost per step plus a cost per sample, so a larger B pays
               off exactly as far as the fixed cost is amortised. The step time is the slowest rank's compute
               time, so a slow rank (and the balancer's answer to it) enters the choice.
  candidates   B / FACTOR, B, B x FACTOR (FACTOR = 2), within [min_batch, max_batch].
  explore      a candidate outside the range of batch sizes seen so far would be priced by extrapolation, which an
               affine fit around one B cannot do (on a CPU a 2x larger B is far from 2x cheaper per sample): it is
               tried instead, for EXPLORE_STEPS steps, once; then the fit covers it.
  move         to the best candidate only when its predicted goodput beats the current B's by more than
               `threshold` (default 5 %): no flapping between two batch sizes that are as good.
Decisions are made by rank 0 and broadcast (agreement.decided_by_rank0) like every other.
"""
from __future__ import annotations

from .cost_model import AffineCost, fit_affine
from .noise_scale import NoiseEstimate, NoiseScaleSmoother

FACTOR = 2
EXPLORE_STEPS = 4
TIMES_PER_BATCH = 16   # the most recent step times kept per batch size: a B tried once stays priced


class GoodputRule:
    def __init__(self, *, initial_batch: int, min_batch: int, max_batch: int, decide_every: int = 50,
                 threshold: float = 0.05, noise_decay: float = 0.98):
        if not threshold >= 0:
            raise ValueError(f"goodput threshold must be >= 0, got {threshold}")
        if decide_every < 1:
            raise ValueError(f"decide_every must be >= 1, got {decide_every}")
        self.decide_every = decide_every
        self.initial_batch, self.min_batch, self.max_batch = initial_batch, min_batch, max_batch
        self.threshold = threshold
        self.smoother = NoiseScaleSmoother(noise_decay)
        self.times: dict[int, list[float]] = {}   # batch size -> its most recent step times
        self.explored: set[int] = set()
        self.exploring: int | None = None   # while a candidate is tried: the B to return to

    def observe(self, global_batch: int, step_s: float, estimate: NoiseEstimate | None) -> None:
        self.smoother.update(estimate)
        recent = self.times.setdefault(int(global_batch), [])
        recent.append(float(step_s))
        del recent[:-TIMES_PER_BATCH]
        self.explored.add(int(global_batch))

    @property
    def noise_scale(self) -> float:
        return self.smoother.noise_scale

    def efficiency(self, batch: int) -> float:
        noise = self.noise_scale
        return (noise + self.initial_batch) / (noise + batch)

    def step_line(self) -> AffineCost | None:
        return fit_affine([(batch, seconds) for batch, times in self.times.items() for seconds in times])

    def goodput(self, batch: int, line: AffineCost) -> float:
        """Samples of progress per second at `batch` (relative to B_0's efficiency)."""
        return self.efficiency(batch) * batch / line.time_s(batch)

    def candidates(self, current: int) -> list[int]:
        found = {min(max(int(round(b)), self.min_batch), self.max_batch)
                 for b in (current / FACTOR, current, current * FACTOR)}
        return sorted(found)

    def decide(self, current: int) -> tuple[int, int]:
        """(the global batch for the next steps, how many steps until the next decision)."""
        if self.exploring is not None:   # the tried B has had its EXPLORE_STEPS steps: back to where it was
            current, self.exploring = self.exploring, None
        if not self.noise_scale > 0:   # not measured yet (NaN), or noise made it meaningless
            return current, self.decide_every
        unseen = [b for b in self.candidates(current) if b not in self.explored]
        if unseen:   # price it by measuring, not by extrapolating
            self.exploring = current
            return unseen[0], EXPLORE_STEPS
        line = self.step_line()
        if line is None:
            return current, self.decide_every
        best = max(self.candidates(current), key=lambda b: self.goodput(b, line))
        if self.goodput(best, line) > (1 + self.threshold) * self.goodput(current, line):
            return best, self.decide_every
        return current, self.decide_every

    def state_dict(self) -> dict:
        return {"smoother": self.smoother.state_dict(),
                "times": [[batch, list(times)] for batch, times in sorted(self.times.items())],
                "explored": sorted(self.explored), "exploring": self.exploring or 0}

    def load_state_dict(self, state: dict) -> None:
        self.smoother.load_state_dict(state["smoother"])
        self.times = {int(batch): [float(t) for t in times] for batch, times in state["times"]}
        self.explored = set(int(b) for b in state["explored"])
        self.exploring = int(state["exploring"]) or None
