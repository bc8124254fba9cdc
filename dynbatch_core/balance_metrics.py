"""How well a balancer split the global batch: pure functions on a run's steps.csv / epochs.csv tables.

    from dynbatch_core import read_run
    from dynbatch_core.balance_metrics import (balance_efficiency, ideal_split, settle_step, oscillation,
                                               steady_throughput, time_to_accuracy, ceiling_speedup)
    run = read_run("runs/pid-1-3")
    ideal = ideal_split(128, [1, 3])                        # [96.0, 32.0]: b_i proportional to 1/k_i
    settled = settle_step(run.steps, change_step=0, ideal=ideal)   # first step from which every b_i stays close
    balance_efficiency(run.steps)                            # one row per step: step, efficiency
    oscillation(run.steps, after_step=settled)               # largest (max b_i - min b_i) / mean b_i
    steady_throughput(run.steps, after_step=48)              # samples/s over steps >= 48
    time_to_accuracy(run.epochs, target=0.9)                 # training seconds of the first epoch with acc >= 0.9
    ceiling_speedup([1, 3])                                  # 2.0 = mean(speed) / min(speed), speed = 1/k

Definitions (n ranks, B the global batch, b_i rank i's batch, k_i its slowdown):
  balance efficiency  per step: sum_i compute_i / (n * max_i compute_i); 1 = no rank waited for another.
  ideal split         b*_i = B * (1/k_i) / sum_j (1/k_j), as floats: equal compute times when a rank's compute is
                      k_i times a per-sample cost (no fixed per-step cost).
  settled             |b_i - b*_i| <= tolerance * B / n for every rank (tolerance 0.05: within 5 % of the equal
                      share). The tolerance is relative to B / n, not to b*_i, so a rank holding 4 samples is not
                      held to +-0.2 samples. settle_step is the first step s >= change_step such that every step
                      from s to the end of the window is settled.
  oscillation         max over ranks of (max b_i - min b_i) / mean b_i over a window of steps.
  step time           max over ranks of (compute_s + wait_s): every rank's step ends at the same all-reduce, and
                      the rank that started first measured the longest interval. It leaves out data loading and
                      the optimizer step (a few ms), so steady_throughput is a slight over-estimate of wall-clock
                      samples/s (epochs.csv's samples_per_s includes everything, per epoch).
Windows are half-open step ranges [after_step, end_step); end_step None means to the last step.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd


def _window(steps: pd.DataFrame, after_step: int = 0, end_step: int | None = None) -> pd.DataFrame:
    keep = steps["step"] >= after_step
    if end_step is not None:
        keep &= steps["step"] < end_step
    return steps[keep]


def _rank_batches(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per step, one column per rank, holding rank_batch."""
    return steps.pivot(index="step", columns="rank", values="rank_batch").sort_index()


def balance_efficiency(steps: pd.DataFrame) -> pd.DataFrame:
    """Per step: efficiency = sum_i compute_i / (n * max_i compute_i). Columns: step, efficiency (NaN if max is 0)."""
    grouped = steps.groupby("step", sort=True)["compute_s"].agg(["sum", "max", "count"])
    efficiency = grouped["sum"] / (grouped["count"] * grouped["max"]).where(grouped["max"] > 0)
    return pd.DataFrame({"step": grouped.index.to_numpy(), "efficiency": efficiency.to_numpy(float)})


def ideal_split(global_batch: float, slowdowns: Sequence[float]) -> list[float]:
    """b*_i = B * (1/k_i) / sum_j (1/k_j): the split that equalises compute times when cost is per sample."""
    if not slowdowns or any(not k > 0 for k in slowdowns):
        raise ValueError(f"slowdowns must be positive, one per rank, got {list(slowdowns)}")
    speeds = [1.0 / k for k in slowdowns]
    return [global_batch * speed / sum(speeds) for speed in speeds]


def ceiling_speedup(slowdowns: Sequence[float]) -> float:
    """Best speed-up of the ideal split over the equal split: mean(speed) / min(speed), speed_i = 1/k_i."""
    speeds = [1.0 / k for k in slowdowns]
    return float(np.mean(speeds) / min(speeds))


def settle_step(steps: pd.DataFrame, change_step: int, ideal: Sequence[float], tolerance: float = 0.05,
                end_step: int | None = None) -> int | None:
    """First step s >= change_step from which every rank's batch stays within tolerance * B/n of `ideal`.

    B = sum(ideal), n = len(ideal). Only steps in [change_step, end_step) are looked at (end_step: the next change).
    None when the window's last step is not settled (or the window is empty).
    """
    batches = _rank_batches(_window(steps, change_step, end_step))
    if batches.empty:
        return None
    if batches.shape[1] != len(ideal):
        raise ValueError(f"ideal has {len(ideal)} entries but the steps hold {batches.shape[1]} ranks")
    band = tolerance * sum(ideal) / len(ideal)
    settled = (batches.sub(np.asarray(ideal, float), axis=1).abs() <= band + 1e-9).all(axis=1).to_numpy()
    if not settled[-1]:
        return None
    unsettled = np.flatnonzero(~settled)
    first = 0 if unsettled.size == 0 else unsettled[-1] + 1
    return int(batches.index[first])


def oscillation(steps: pd.DataFrame, after_step: int, end_step: int | None = None) -> float:
    """max over ranks of (max b_i - min b_i) / mean b_i over steps in [after_step, end_step); NaN if no steps."""
    batches = _rank_batches(_window(steps, after_step, end_step))
    if batches.empty:
        return math.nan
    return float(((batches.max() - batches.min()) / batches.mean()).max())


def step_times(steps: pd.DataFrame) -> pd.Series:
    """Seconds per step (index: step): max over ranks of compute_s + wait_s."""
    return (steps["compute_s"] + steps["wait_s"]).groupby(steps["step"]).max().sort_index()


def steady_throughput(steps: pd.DataFrame, after_step: int = 0, end_step: int | None = None) -> float:
    """Samples per second over steps in [after_step, end_step): sum of global_batch / sum of step times."""
    window = _window(steps, after_step, end_step)
    if window.empty:
        return math.nan
    samples = window.groupby("step")["global_batch"].first().sum()
    return float(samples / step_times(window).sum())


def time_to_accuracy(epochs: pd.DataFrame, target: float) -> float:
    """wall_s (training seconds, evaluation excluded) at the end of the first epoch whose test_acc >= target.

    Accuracy is only measured at epoch ends, so nothing is interpolated: NaN if no epoch reached the target.
    """
    reached = epochs[epochs["test_acc"] >= target]
    return float(reached["wall_s"].iloc[0]) if not reached.empty else math.nan


def runnable_ranks(steps: pd.DataFrame) -> float:
    """Mean number of ranks computing (not sleeping, not waiting) per second of step time.

    Needs a `slowdown` column (k of that rank at that step): a rank's own forward+backward time is compute_s / k
    (the rest of compute_s is the emulated sleep). On a machine with C cores, a value above C means the ranks
    competed for cores, which slowed every rank's measured compute.
    """
    if "slowdown" not in steps:
        raise ValueError("runnable_ranks needs a 'slowdown' column (the rank's k at that step)")
    busy = (steps["compute_s"] / steps["slowdown"]).groupby(steps["step"]).sum().sort_index()
    return float(busy.sum() / step_times(steps).sum())


def slowdown_segments(steps: pd.DataFrame) -> list[tuple[int, int, tuple[float, ...]]]:
    """(first step, end step (exclusive), per-rank factors) of each stretch of steps.csv over which no rank's
    `slowdown` changed: one stretch for a fixed --slowdown, one per change of a --slowdown-trace."""
    factors = steps.pivot(index="step", columns="rank", values="slowdown").sort_index()
    rows, step_ids = [tuple(float(k) for k in row) for row in factors.to_numpy()], factors.index.tolist()
    segments, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[start]:
            segments.append((int(step_ids[start]), int(step_ids[i - 1]) + 1, rows[start]))
            start = i
    return segments
