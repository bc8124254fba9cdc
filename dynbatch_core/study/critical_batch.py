"""The adaptive-batch analysis: time on emulated hardware, the critical batch measured from a sweep of static
batches, and the noise scale at the target, all read from the runs' own tables.

    timeline = emulated_timeline(result.steps)                # per step: B and the emulated seconds at its end
    epochs = with_emulated_time(result.epochs, result.steps)  # + emulated_s at each epoch's end
    fit = fit_critical_batch(batches=[16, 64, 256], samples=[9e3, 1.1e4, 2.4e4])
    fit.critical_batch, fit.min_steps, fit.min_samples, fit.steps_at(128)
    sweep = static_sweep(race)                     # race: adaptive_findings.race_table's; per static B its samples
    noise_at_target(race, results)                 # B_simple when the static runs reached the target (median)

Emulated time (--emulated-sample-ms with --skip-emulated-sleep): a step takes as long as its slowest rank's
compute_s, which under emulation is exactly (step_ms + b x sample_ms) x k; communication and the host's own
overhead count for nothing, as on hardware whose step cost the emulation describes.

The critical batch (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", eq. 2.11): the steps S
and samples E = B S a run needs to reach a target trade off as (S/S_min - 1)(E/E_min - 1) = 1, i.e.
S(B) = S_min (1 + B_crit / B) with B_crit = E_min / S_min. So S is linear in 1/B: a least-squares line through
(1/B, S) over the static batches gives S_min (intercept) and S_min B_crit (slope). A non-positive intercept means
the sweep did not reach the regime where steps stop falling; the fit then says so (NaN) rather than clamp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd


def emulated_timeline(steps: pd.DataFrame) -> pd.DataFrame:
    """Per global step: epoch, step, global_batch and emulated_s, the sum of the slowest rank's compute_s up to and
    including that step (with a 'run' column, per run)."""
    keys = ["run"] if "run" in steps else []
    per_step = (steps.groupby(keys + ["epoch", "step"], sort=False)
                .agg(global_batch=("global_batch", "first"), step_s=("compute_s", "max")).reset_index()
                .sort_values(keys + ["step"], kind="stable"))
    per_step["emulated_s"] = per_step.groupby(keys, sort=False)["step_s"].cumsum() if keys \
        else per_step["step_s"].cumsum()
    return per_step.drop(columns="step_s").reset_index(drop=True)


def with_emulated_time(epochs: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """`epochs` with an emulated_s column: the emulated time at the end of each epoch's last step."""
    timeline = emulated_timeline(steps)
    keys = ["run"] if "run" in epochs else []
    ends = timeline.groupby(keys + ["epoch"], sort=False)["emulated_s"].max().reset_index()
    return epochs.merge(ends, on=keys + ["epoch"], how="left")


@dataclass(frozen=True)
class CriticalBatchFit:
    critical_batch: float   # B_crit = E_min / S_min (NaN when the sweep cannot tell)
    min_steps: float        # S_min: steps to the target at an infinite batch
    min_samples: float      # E_min: samples to the target at a batch of one
    batches: tuple[int, ...]   # the static batches that reached the target, used in the fit

    def steps_at(self, batch: float | np.ndarray) -> float | np.ndarray:
        """McCandlish's S(B) = S_min (1 + B_crit / B): the steps to the target at batch B (an array: per B)."""
        return self.min_steps * (1 + self.critical_batch / batch)


def fit_critical_batch(batches: Sequence[int], samples: Sequence[float]) -> CriticalBatchFit:
    """McCandlish's S(B) = S_min (1 + B_crit/B) fitted to the samples each static batch needed to reach the target
    (NaN samples: never reached; left out). Needs two or more batches that reached it."""
    pairs = [(int(b), float(e)) for b, e in zip(batches, samples) if math.isfinite(e)]
    nan = CriticalBatchFit(math.nan, math.nan, math.nan, tuple(b for b, _ in pairs))
    if len({b for b, _ in pairs}) < 2:
        return nan
    inverse = np.array([1.0 / b for b, _ in pairs])
    steps = np.array([e / b for b, e in pairs])
    slope, intercept = np.polyfit(inverse, steps, 1)
    if not (intercept > 0 and slope > 0):
        return nan
    return CriticalBatchFit(float(slope / intercept), float(intercept), float(slope), nan.batches)


def noise_scale_at(epochs: pd.DataFrame, samples: float) -> float:
    """The epoch noise scale B_simple of the epoch during which the run had seen `samples` (NaN if none)."""
    if not math.isfinite(samples):
        return math.nan
    seen = epochs["samples"].cumsum().to_numpy(float)
    index = int(np.searchsorted(seen, samples))
    return float(epochs["noise_scale"].iloc[min(index, len(epochs) - 1)])


def static_sweep(race: pd.DataFrame) -> pd.DataFrame:
    """Per static batch of a race table (adaptive_findings.race_table: run, kind, seed, batch, samples), the median
    over seeds of the samples it needed to reach the target: columns batch, samples, smallest batch first (the
    input of fit_critical_batch and of the critical-batch figure)."""
    static = race[race["kind"] == "static"]
    return static.groupby("batch", as_index=False)["samples"].median().sort_values("batch")


def noise_at_target(race: pd.DataFrame, results: Mapping[tuple[str, int], object]) -> float:
    """The noise scale B_simple when the static runs reached the target: per static run and seed of `race`,
    noise_scale_at its samples to the target in its epochs (results: {(label, seed): RunResult}); their median
    (NaN when none reached it)."""
    static = race[race["kind"] == "static"]
    at_target = [noise_scale_at(results[label, seed].epochs, samples)
                 for label, seed, samples in zip(static["run"], static["seed"], static["samples"])]
    return float(pd.Series(at_target, dtype=float).median())
