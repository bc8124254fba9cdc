"""The metrics of the notebooks, figures and benchmarks: pure functions on a run's steps.csv / epochs.csv tables
(with a `run` column when they hold several runs, and a `seed` column when seeds repeat them; tag_runs adds both).

    from dynbatch_core import read_run
    from dynbatch_core.study.analysis import (balance_efficiency, ideal_split, settle_step, oscillation,
                                        steady_throughput, time_to_reach, ceiling_speedup)
    run = read_run("runs/pid-1-3")
    ideal = ideal_split(128, [1, 3])                        # [96.0, 32.0]: b_i proportional to 1/k_i
    settled = settle_step(run.steps, change_step=0, ideal=ideal)   # first step from which every b_i stays close
    balance_efficiency(run.steps)                            # one row per step: step, efficiency
    oscillation(run.steps, after_step=settled)               # largest (max b_i - min b_i) / mean b_i
    steady_throughput(run.steps, after_step=48)              # samples/s over steps >= 48
    time_to_reach(tag_runs({"pid": run.epochs}), "test_acc", 0.9, lower_is_better=False)   # seconds, samples
    tag_runs({("pid", 0): run, ("pid", 1): other}, table="epochs")   # run and seed columns, from RunResults
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
  time to reach       the training seconds (and samples) at which a metric first reaches a target, interpolated
                      linearly between the epoch ends where it is measured (time_to_reach: the one definition).
  speed-up            samples/s of a balancer over the equal split's at the same slowdown, last epoch.
  priced time         a run's training seconds re-priced from one price list shared by every run compared: per
                      global batch, the median seconds per sample over all their epochs at that batch. Load that
                      hit one run and not another then cannot decide a race (only for runs whose cost depends on B
                      alone: same ranks, same split rule).
  seed band           a ratio measured once per seed and the seeds' spread [lowest, highest]: a difference only
                      when the whole band lies on one side of the compared value (every seed agrees).
Windows are half-open step ranges [after_step, end_step); end_step None means to the last step.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

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
                end_step: int | None = None, hold: int | None = None) -> int | None:
    """First step s >= change_step from which every rank's batch stays within tolerance * B/n of `ideal`.

    B = sum(ideal), n = len(ideal). Only steps in [change_step, end_step) are looked at (end_step: the next change).
    hold=None: stays to the window's end, and None when the window's last step is not settled (or the window is
    empty). hold=k: stays for k steps in a row (the first such run; a later excursion, e.g. a burst of load on a
    real machine, does not undo it), None when no such run exists.
    """
    batches = _rank_batches(_window(steps, change_step, end_step))
    if batches.empty:
        return None
    if batches.shape[1] != len(ideal):
        raise ValueError(f"ideal has {len(ideal)} entries but the steps hold {batches.shape[1]} ranks")
    band = tolerance * sum(ideal) / len(ideal)
    settled = (batches.sub(np.asarray(ideal, float), axis=1).abs() <= band + 1e-9).all(axis=1).to_numpy()
    if hold is not None:
        if hold < 1:
            raise ValueError(f"hold must be at least 1 step, got {hold}")
        runs = np.convolve(settled.astype(int), np.ones(hold, int), mode="valid")   # settled steps in each window
        starts = np.flatnonzero(runs == hold)
        return int(batches.index[starts[0]]) if starts.size else None
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


def run_labels(table: pd.DataFrame) -> list[str]:
    """Run labels in order of first appearance (the order the notebook ran them)."""
    if "run" not in table:
        raise ValueError("the table needs a 'run' column naming each curve (see tag_runs)")
    return list(dict.fromkeys(table["run"]))


def tag_runs(tables: Mapping[str | tuple[str, int], object], *, table: str | None = None,
             **columns: Mapping[object, object]) -> pd.DataFrame:
    """One table from {run: table}, with a 'run' column first: the one way to put several runs in one table.

    A key is a run label, or (label, seed) for a run repeated per seed, which adds a 'seed' column after 'run'.
    table: the attribute holding each value's table ("steps" or "epochs" of a RunResult); None: the values are
    the tables. `columns` adds more per-run columns after those, each a mapping {key: value}.
    """
    parts = []
    for key, value in tables.items():
        part = (value if table is None else getattr(value, table)).copy()
        label, seed = key if isinstance(key, tuple) else (key, None)
        for name, values in reversed(list(columns.items())):
            part.insert(0, name, [values[key]] * len(part))
        if seed is not None:
            part.insert(0, "seed", int(seed))
        part.insert(0, "run", label)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def of_seed(runs: Mapping[tuple[str, int], object], seed: int) -> dict[str, object]:
    """{label: value} of the runs keyed (label, seed) that ran at `seed`, in their order."""
    return {label: value for (label, run_seed), value in runs.items() if run_seed == seed}


def efficiency_table(steps: pd.DataFrame) -> pd.DataFrame:
    """balance_efficiency for each run: columns run, epoch, step, global_batch, efficiency."""
    tables = {}
    for run in run_labels(steps):
        part = steps[steps["run"] == run]
        per_step = part.groupby("step", sort=True)[["epoch", "global_batch"]].first().reset_index()
        tables[run] = per_step.merge(balance_efficiency(part), on="step")
    return tag_runs(tables)[["run", "epoch", "step", "global_batch", "efficiency"]]


def slowdown_sweep(balancers: Sequence[str], slowdown: Sequence[float], slowest: Sequence[float]
                   ) -> dict[str, tuple[str, list[float]]]:
    """The heterogeneous notebook's sweep: per k in `slowest`, `slowdown` with the slowest rank's factor replaced by
    k, and one run of each balancer there: {"dbs k=2": ("dbs", [1, 2]), ...} (label: (balancer, slowdown vector))."""
    sweep = {}
    for k in slowest:
        vector = [k if s == max(slowdown) else s for s in slowdown]
        for balancer in balancers:
            sweep[f"{balancer} k={k:g}"] = (balancer, vector)
    return sweep


def balancer_table(tables: Mapping[str, object], slowdown: Sequence[float],
                   sweep: Mapping[str, tuple[str, Sequence[float]]], *, table: str | None = None) -> pd.DataFrame:
    """tag_runs of the runs with the columns speedup_table reads: balancer, slowest (the largest k) and slowdown
    (the vector as text, "1,3"). A run of `sweep` (slowdown_sweep's) is at its vector; any other run is labelled
    by its balancer and ran at `slowdown`."""
    at = {label: sweep.get(label, (label, slowdown)) for label in tables}
    return tag_runs(tables, table=table, balancer={label: balancer for label, (balancer, _) in at.items()},
                    slowest={label: max(vector) for label, (_, vector) in at.items()},
                    slowdown={label: ",".join(f"{k:g}" for k in vector) for label, (_, vector) in at.items()})


def speedup_table(epochs: pd.DataFrame, *, baseline: str = "equal") -> pd.DataFrame:
    """Speed-up of each balancer over `baseline` at each slowdown, from the last epoch's samples/s.

    `epochs` needs columns balancer, slowest (the slowest rank's k), slowdown (the whole vector, as text or tuple),
    epoch and samples_per_s (balancer_table adds the first three). The last epoch is used so that a balancer
    that adapts after the first epoch (dbs) is measured once it has adapted. Columns out: slowest, slowdown,
    balancer, samples_per_s, speedup, ceiling.
    """
    last = epochs.sort_values("epoch").groupby(["slowest", "balancer"], sort=False).tail(1)
    rows = []
    for slowest, group in last.groupby("slowest"):
        base = group.loc[group["balancer"] == baseline, "samples_per_s"]
        if base.empty:
            continue
        slowdown = group["slowdown"].iloc[0]
        vector = [float(k) for k in (slowdown.split(",") if isinstance(slowdown, str) else slowdown)]
        for row in group.itertuples():
            rows.append({"slowest": slowest, "slowdown": slowdown, "balancer": row.balancer,
                         "samples_per_s": row.samples_per_s, "speedup": row.samples_per_s / base.iloc[0],
                         "ceiling": ceiling_speedup(vector)})
    order = {name: i for i, name in enumerate(dict.fromkeys(epochs["balancer"]))}  # as the notebook ran them
    table = pd.DataFrame(rows, columns=["slowest", "slowdown", "balancer", "samples_per_s", "speedup", "ceiling"])
    return table.sort_values(["slowest", "balancer"], key=lambda col: col.map(order) if col.name == "balancer"
                             else col, ignore_index=True)


def fitted_step_time_table(steps: pd.DataFrame) -> pd.DataFrame:
    """Rows of runs whose balancer fits step-time lines (model_a_s, model_c_s), with `fitted_s` = a + c · b: the
    line as fitted after the step (it includes that step's point)."""
    if "model_a_s" not in steps.columns:
        return steps.iloc[0:0].assign(fitted_s=[])
    table = steps.dropna(subset=["model_a_s", "model_c_s"]).copy()
    table["fitted_s"] = table["model_a_s"] + table["model_c_s"] * table["rank_batch"]
    return table


# How a sentence names priced_s (findings.describe_seeded_race's time_phrase, describe_schedule_race).
PRICED_TIME_PHRASE = "priced time (each epoch: its samples x the median seconds per sample at its B over all runs)"


def priced_time(epochs: pd.DataFrame) -> pd.DataFrame:
    """The table with `priced_s`: cumulative training seconds per run (and seed, where there is a `seed` column)
    with every epoch priced at samples x the median seconds per sample of all epochs at its global batch."""
    per_sample = epochs["epoch_s"] / epochs["samples"]
    price = per_sample.groupby(epochs["global_batch"]).median()
    cost = epochs["samples"] * epochs["global_batch"].map(price)
    keys = ["run", "seed"] if "seed" in epochs else ["run"]
    return epochs.assign(priced_s=cost.groupby([epochs[k] for k in keys], sort=False).cumsum())


def seed_band(ratios: Sequence[float], against: float = 1.0) -> dict:
    """A ratio measured once per seed: its median, the seeds' spread (low, high) and where the band lies relative
    to `against`: "above", "below", "within" (the band holds it: no difference within the seeds' noise), or
    "one seed" (no spread to judge by)."""
    values = [float(r) for r in ratios]
    if not values:
        raise ValueError("seed_band needs at least one seed's ratio")
    low, high = min(values), max(values)
    side = ("one seed" if len(values) == 1 else "above" if low > against else "below" if high < against
            else "within")
    return {"median": float(np.median(values)), "low": low, "high": high, "seeds": len(values), "side": side}


def time_to_reach(epochs: pd.DataFrame, column: str, target: float, *, lower_is_better: bool,
                  time_column: str = "wall_s") -> pd.DataFrame:
    """Per run: the training seconds (`time_column`) and samples at which `column` first reaches `target`.

    Linear interpolation between epoch ends; reached during the first epoch counts at that epoch's end. Columns:
    run, time_s, samples (NaN where never reached).
    """
    rows = []
    for run in run_labels(epochs):
        part = epochs[epochs["run"] == run]
        values = part[column].to_numpy(float)
        times = part[time_column].to_numpy(float)
        samples = part["samples"].cumsum().to_numpy(float)
        reached = values <= target if lower_is_better else values >= target
        time_s = seen = math.nan
        if reached.any():
            j = int(np.argmax(reached))
            time_s, seen = times[j], samples[j]
            if j > 0 and values[j] != values[j - 1]:
                fraction = (target - values[j - 1]) / (values[j] - values[j - 1])
                time_s = times[j - 1] + fraction * (times[j] - times[j - 1])
                seen = samples[j - 1] + fraction * (samples[j] - samples[j - 1])
        rows.append({"run": run, "time_s": time_s, "samples": seen})
    return pd.DataFrame(rows, columns=["run", "time_s", "samples"])


def seeded_race(epochs: pd.DataFrame, baseline: str, *, time_column: str = "wall_s") -> pd.DataFrame:
    """Per seed and run: the time to the seed's target, the lowest of its runs' best test accuracies (so every run
    reaches it, and a run's late dip does not move it to where the runs have not yet parted), and how many times
    faster than `baseline` it got there (`speedup` = baseline's time / the run's). `epochs` needs run and seed
    columns. Columns: seed, run, target, time_s, samples, speedup."""
    rows = []
    for seed, part in epochs.groupby("seed", sort=True):
        target = float(part.groupby("run", sort=False)["test_acc"].max().min())
        reach = time_to_reach(part, "test_acc", target, lower_is_better=False, time_column=time_column)
        base = float(reach.loc[reach["run"] == baseline, "time_s"].iloc[0])
        rows += [{"seed": int(seed), "run": row.run, "target": target, "time_s": row.time_s,
                  "samples": row.samples, "speedup": base / row.time_s} for row in reach.itertuples()]
    return pd.DataFrame(rows, columns=["seed", "run", "target", "time_s", "samples", "speedup"])


def timing_spread(epochs: pd.DataFrame) -> dict | None:
    """How far the runs' throughput differs at a global batch every run used, where it differs most: spread (the
    largest ratio of median samples/s between runs there), batch, and the slowest and fastest run's medians (low,
    low_run, high, high_run). None with fewer than two runs or no batch they all used."""
    medians = epochs.groupby(["global_batch", "run"])["samples_per_s"].median().unstack("run")
    shared = medians.dropna()  # batches every run used
    if epochs["run"].nunique() < 2 or shared.empty:
        return None
    spreads = shared.max(axis=1) / shared.min(axis=1)
    batch = spreads.idxmax()
    row = shared.loc[batch]
    return {"spread": float(spreads[batch]), "batch": batch, "low": row.min(), "low_run": row.idxmin(),
            "high": row.max(), "high_run": row.idxmax()}


def schedule_race(epochs: pd.DataFrame, *, expected_fastest: Sequence[str] = ("decreasing", "loss-plateau"),
                  time_column: str = "wall_s") -> dict:
    """The numbers of a race of batch schedules to the highest final training loss (every run reaches it), for
    findings.describe_schedule_race.

    Time to a loss = samples needed / samples per second, so the numbers say which of the two decided it
    (`decided_by`: "samples" or "rate"). time_column "priced_s" (priced_time): the race is on priced time, which
    load on the machine during one run cannot decide; `wall_s` then holds each run's wall-clock time beside it,
    and `spread` (the timing noise that can hide a difference) is 1. Otherwise `timing` is timing_spread's.
    The runs are ranked by time, or, when the whole race lies within the timing noise (time_ratio <= spread), by
    samples needed (`ranked_by`); `agree`: whether the first two are the class study's `expected_fastest`.
    """
    priced = time_column == "priced_s"
    finals = epochs.groupby("run", sort=False).tail(1).set_index("run")
    target = float(finals["train_loss"].max())
    reach = time_to_reach(epochs, "train_loss", target, lower_is_better=True, time_column=time_column
                          ).sort_values("time_s")
    reach["rate"] = reach["samples"] / reach["time_s"]
    fastest, slowest = reach.iloc[0], reach.iloc[-1]
    wall = (time_to_reach(epochs, "train_loss", target, lower_is_better=True).set_index("run")["time_s"].to_dict()
            if priced else None)
    timing = None if priced else timing_spread(epochs)
    spread = 1.0 if timing is None else timing["spread"]
    by_samples = reach.sort_values("samples")
    sample_ratio = slowest.samples / fastest.samples
    rate_ratio = fastest.rate / slowest.rate
    time_ratio = slowest.time_s / fastest.time_s
    ranked_by = "samples" if time_ratio <= spread else "time"
    two_first = list((by_samples if ranked_by == "samples" else reach)["run"].iloc[:2])
    return {"time_column": time_column, "target": target,
            "reach": reach,               # run, time_s, samples, rate (samples/s): fastest first
            "by_samples": by_samples,     # the same rows, fewest samples first
            "wall_s": wall,
            "batches": {run: [int(b) for b in epochs.loc[epochs["run"] == run, "global_batch"]]
                        for run in finals.index},
            "median_rate": epochs.groupby("global_batch")["samples_per_s"].median(),   # per B, ascending
            "fastest": fastest.run, "slowest": slowest.run, "time_ratio": time_ratio,
            "sample_ratio": sample_ratio, "rate_ratio": rate_ratio,
            "decided_by": "samples" if sample_ratio >= rate_ratio else "rate",
            "timing": timing, "spread": spread, "ranked_by": ranked_by, "two_first": two_first,
            "expected_fastest": list(expected_fastest), "agree": set(two_first) == set(expected_fastest)}
