"""The gradient noise scale from the norms every step already has (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A; uneven per-rank batches give it for free, as in Cannikin).

    points = step_points([0.8, 0.3], [16, 48], global_batch=64, global_sq_norm=0.2)
    estimate = fit_step(points, num_samples=60000)        # NoiseEstimate(gradient_sq=..., trace=...)
    smoother = NoiseScaleSmoother(decay=0.98); smoother.update(estimate); smoother.noise_scale

The mean gradient over a batch of b samples drawn without replacement from N has E|g_b|^2 = |G|^2 + S x(b) with
x(b) = (1/b - 1/N) N/(N-1), where G is the full-data gradient and S = tr(Sigma) the trace of the per-sample
gradients' covariance (1/N normalised). Each step holds one point per rank with samples (b_i, |g_{b_i}|^2), taken
before the reduction, and the global point (B, |g_B|^2) after it: a least-squares line in x gives |G|^2 (intercept)
and S (slope). With equal splits that is McCandlish's two-batch estimator; uneven splits spread x further. The
exact loss divides by the global B, so a rank's gradient before the reduction is b_i/B times its mean gradient:
|g_{b_i}|^2 = (B/b_i)^2 x its squared norm.

One rank has one batch size per step: the step then runs as two micro-batches (gradient accumulation) and the norm
after the first half is the small-batch point (the cost: one extra squared norm and halved micro-batches).

B_simple = S/|G|^2 is a ratio of noisy estimates: numerator and denominator are averaged separately (ratio of
averages). A step whose |G|^2 estimate is not positive is kept in those averages (its noise cancels there) but
counted as missing: its own ratio would be meaningless, and it is never clamped. A step with a non-finite norm (a
float16 step whose loss scale overflowed: GradScaler skips it) gives no estimate at all and is counted as missing;
one such point must never reach an average, where it would stay NaN for the rest of the run.

The smoothed noise scale is +inf when the smoothed |G|^2 is not positive but the smoothed trace is (noise
dominates: the limit B_simple -> infinity, where AdaScale's gain is B/B_0 and every batch size is as efficient as
B_0), and NaN before any estimate or while the smoothed trace is not positive either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class NoiseEstimate:
    gradient_sq: float   # |G|^2 estimate (may be <= 0: noise)
    trace: float         # S = tr(Sigma) estimate

    @property
    def missing(self) -> bool:
        return not self.gradient_sq > 0

    @property
    def noise_scale(self) -> float:
        """B_simple = S/|G|^2 of this one step, NaN when |G|^2 is not positive."""
        return self.trace / self.gradient_sq if not self.missing else math.nan


def step_points(local_sq_norms: Sequence[float], local_batches: Sequence[int], global_batch: int,
                global_sq_norm: float) -> list[tuple[int, float]]:
    """(batch size, squared norm of that batch's mean gradient) for every part with samples, and the global one.

    local_sq_norms[i] is |sum of part i's per-sample gradients / B|^2: what rank i holds before the reduction (or,
    at one rank, the gradient after the step's first half)."""
    points = [(b, (global_batch / b) ** 2 * norm) for b, norm in zip(local_batches, local_sq_norms) if b > 0]
    return points + [(global_batch, global_sq_norm)]


def without_replacement_x(batch: int, num_samples: int) -> float:
    """x(b) = (1/b - 1/N) N/(N-1): the variance of a mean over b of N samples drawn without replacement, per S."""
    if num_samples <= 1:
        return 1.0 / batch
    return (1.0 / batch - 1.0 / num_samples) * num_samples / (num_samples - 1)


def fit_step(points: Sequence[tuple[int, float]], num_samples: int) -> NoiseEstimate | None:
    """The line y = |G|^2 + S x(b) through the points by weighted least squares; None when they hold one batch size.

    A point's noise grows with its x (the spread of |g_b|^2 is about proportional to S x(b) when noise dominates),
    so each is weighted by 1/x^2: a 4-sample slice must not outvote the 64-sample global gradient. The weights
    depend on b only, so the estimate stays unbiased; with two batch sizes it is McCandlish's estimator."""
    xs = [without_replacement_x(b, num_samples) for b, _ in points]
    ys = [y for _, y in points]
    if max(xs) - min(xs) <= 1e-12 * max(xs) or not all(math.isfinite(y) for y in ys):
        return None   # one batch size, or an overflowed (float16) step: nothing to fit
    weights = [1.0 / max(x, 1e-12) ** 2 for x in xs]
    total = sum(weights)
    mean_x = sum(w * x for w, x in zip(weights, xs)) / total
    mean_y = sum(w * y for w, y in zip(weights, ys)) / total
    sxx = sum(w * (x - mean_x) ** 2 for w, x in zip(weights, xs))
    slope = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in zip(weights, xs, ys)) / sxx
    return NoiseEstimate(gradient_sq=mean_y - slope * mean_x, trace=slope)


class NoiseScaleSmoother:
    """Exponential averages of |G|^2 and S kept apart (a ratio of averages), with bias correction."""

    def __init__(self, decay: float = 0.98):
        if not 0 <= decay < 1:
            raise ValueError(f"noise-scale decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.gradient_sq = 0.0
        self.trace = 0.0
        self.weight = 0.0   # the bias correction: 1 - decay^steps

    def update(self, estimate: NoiseEstimate | None) -> None:
        if estimate is None or not (math.isfinite(estimate.gradient_sq) and math.isfinite(estimate.trace)):
            return
        self.gradient_sq = self.decay * self.gradient_sq + (1 - self.decay) * estimate.gradient_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * estimate.trace
        self.weight = self.decay * self.weight + (1 - self.decay)

    @property
    def noise_scale(self) -> float:
        """Smoothed B_simple: +inf while the smoothed |G|^2 is not positive and the smoothed trace is (pure noise),
        NaN before any estimate or while neither is positive."""
        if self.weight == 0:
            return math.nan
        if not self.gradient_sq > 0:
            return math.inf if self.trace > 0 else math.nan
        return self.trace / self.gradient_sq

    def state_dict(self) -> dict:
        return {"decay": self.decay, "gradient_sq": self.gradient_sq, "trace": self.trace, "weight": self.weight}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.gradient_sq = state["decay"], state["gradient_sq"]
        self.trace, self.weight = state["trace"], state["weight"]


def mean_estimate(estimates: Sequence[NoiseEstimate | None]) -> NoiseEstimate:
    """The mean |G|^2 and mean S of the steps that gave an estimate (NaN for none)."""
    found = [estimate for estimate in estimates
             if estimate is not None and math.isfinite(estimate.gradient_sq) and math.isfinite(estimate.trace)]
    if not found:
        return NoiseEstimate(math.nan, math.nan)
    return NoiseEstimate(sum(e.gradient_sq for e in found) / len(found), sum(e.trace for e in found) / len(found))


def epoch_noise_scale(estimates: Sequence[NoiseEstimate | None]) -> tuple[float, int]:
    """(the epoch's B_simple as a ratio of its mean S to its mean |G|^2, steps whose own |G|^2 was not positive)."""
    missing = sum(1 for estimate in estimates if estimate is None or estimate.missing)
    return mean_estimate(estimates).noise_scale, missing
