"""The adaptive-batch notebook's runs, numbers and sentences: the run plan, time to the target per run and seed on
two kinds of time, the pass/fail comparison of goodput against the static sweep and the class study's schedules.

    plans, kinds = race_plan([16, 128], {"increasing": 16}, goodput_batch=64, lr=0.05, lr_reference_batch=64,
                             decide_every=10, goodput_threshold=0.05)    # {label: RunConfig fields}, {label: kind}
    race = race_table(results, kinds, target=0.9)               # results: {(label, seed): RunResult}
    verdict = goodput_verdict(race, time_column="emulated_s")   # dict: passed, ratios, and the numbers behind them
    describe_race(race, verdict, target=0.9, regime="emulated GPU-like cost")   # -> sentences

kinds: label -> "static", "class", "goodput" (the run the verdict is about) or "variant" (reported beside it). A
run that never reached the target counts as infinitely slow (so it can lose a comparison, never win one) and is
named as such.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .analysis import seed_band, tag_runs, time_to_reach
from .critical_batch import CriticalBatchFit, emulated_timeline, with_emulated_time
from .findings import format_seconds
from .notebook import batch_schedule
from ..records import RunResult

GOODPUT_TOLERANCE = 1.1   # goodput may take this many times the best static batch's time
TIME_COLUMNS = {"emulated_s": "emulated GPU-like time", "wall_s": "measured CPU time"}
FIXED_SCHEDULES = ("increasing", "decreasing")   # class schedules whose batches follow from their parameters alone


def race_plan(static_batches: Sequence[int], class_schedules: Mapping[str, int], *, goodput_batch: int, lr: float,
              lr_reference_batch: int, decide_every: int, goodput_threshold: float
              ) -> tuple[dict[str, dict], dict[str, str]]:
    """(plans, kinds): the RunConfig fields of every run of the race, {label: fields}, and each run's kind.

    "static B" per static batch, each class schedule under its name ({name: initial B}), "goodput" from
    goodput_batch, and the variant "goodput adascale". One learning-rate rule: `lr` at `lr_reference_batch`,
    scaled linearly to every B a run trains at (a static run's B never moves, so that is lr x B / reference).
    goodput adascale starts at the same learning rate, lr x goodput_batch / lr_reference_batch, and takes AdaScale's
    gain from there: its reference batch, AdaScale's B_0, is its own initial batch, as goodput's efficiency is.
    """
    linear = dict(lr=lr, lr_reference_batch=lr_reference_batch, lr_scaling="linear")
    plans = {f"static {b}": dict(schedule="static", initial_batch=b, **linear) for b in static_batches}
    kinds = dict.fromkeys(plans, "static")
    for name, b in class_schedules.items():
        plans[name], kinds[name] = dict(schedule=name, initial_batch=b, **linear), "class"
    goodput = dict(schedule="goodput", initial_batch=goodput_batch, decide_every=decide_every,
                   goodput_threshold=goodput_threshold)
    plans["goodput"], kinds["goodput"] = dict(goodput, **linear), "goodput"
    plans["goodput adascale"] = dict(goodput, lr=lr * goodput_batch / lr_reference_batch,
                                     lr_reference_batch=goodput_batch, lr_scaling="adascale")
    kinds["goodput adascale"] = "variant"
    return plans, kinds


def slow_rank_labels(kinds: Mapping[str, str]) -> list[str]:
    """The runs repeated with one slow rank: the static sweep and goodput."""
    return [label for label, kind in kinds.items() if kind in ("static", "goodput")]


def emulated_epochs(runs: Mapping[str | tuple[str, int], RunResult]) -> pd.DataFrame:
    """One epochs table of the runs ({label or (label, seed): RunResult}) with run (and seed) columns and
    emulated_s (critical_batch.with_emulated_time)."""
    return tag_runs({key: with_emulated_time(result.epochs, result.steps) for key, result in runs.items()})


def race_table(results: Mapping[tuple[str, int], RunResult], kinds: Mapping[str, str], *, target: float
               ) -> pd.DataFrame:
    """Per (run, seed): the initial batch, the samples, emulated seconds and CPU seconds to the target accuracy."""
    rows = []
    for (label, seed), result in results.items():
        epochs = emulated_epochs({label: result})
        reach = {column: time_to_reach(epochs, "test_acc", target, lower_is_better=False,
                                       time_column=column).iloc[0] for column in TIME_COLUMNS}
        rows.append({"run": label, "kind": kinds[label], "seed": seed,
                     "batch": int(result.config.get("initial_batch", 0)),
                     "samples": reach["emulated_s"]["samples"],
                     **{column: reach[column]["time_s"] for column in TIME_COLUMNS},
                     "final_test_acc": float(result.epochs["test_acc"].iloc[-1])})
    return pd.DataFrame(rows)


def measured_race(results: Mapping[tuple[str, int], RunResult], cpu_goodput: RunResult, kinds: Mapping[str, str],
                  *, seed: int, target: float) -> pd.DataFrame:
    """race_table of one seed's runs with goodput's run replaced by `cpu_goodput` (the goodput run that decided
    from this machine's step times), under goodput's label: the race on measured time (wall_s)."""
    runs = {(label, run_seed): cpu_goodput if kinds[label] == "goodput" else result
            for (label, run_seed), result in results.items() if run_seed == seed}
    return race_table(runs, kinds, target=target)


def measured_runs(runs: Mapping[str, RunResult], kinds: Mapping[str, str], cpu_runs: Mapping[str, RunResult]
                  ) -> dict[str, RunResult]:
    """One seed's runs ({label: RunResult}) as the figure of the race on measured time shows them: goodput's run
    left out, and `cpu_runs` ({"goodput-cpu": RunResult}, the goodput run that decided from this machine's step
    times) added at the end."""
    return {label: result for label, result in runs.items() if kinds[label] != "goodput"} | dict(cpu_runs)


def moving_runs(runs: Mapping[str, RunResult], kinds: Mapping[str, str], *,
                slow_runs: Mapping[str, RunResult] | None = None, slowdown: Sequence[float] = ()
                ) -> dict[str, RunResult]:
    """The runs whose B moves, {label: RunResult}: goodput, its variants and the class schedules of `runs` (one
    seed's), then goodput's run of `slow_runs` (the slow-rank case) as "goodput, slowdown [1, 3]"."""
    moving = {label: runs[label] for kind in ("goodput", "variant", "class") for label in runs if kinds[label] == kind}
    for label, result in (slow_runs or {}).items():
        if kinds[label] == "goodput":
            moving[f"{label}, slowdown {list(slowdown)}"] = result
    return moving


def batch_timeline(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """Per run and step: epoch, step, global_batch and emulated_s (critical_batch.emulated_timeline), run first."""
    return tag_runs({label: emulated_timeline(result.steps) for label, result in runs.items()})


def fixed_schedules(runs: Mapping[str, RunResult], kinds: Mapping[str, str]) -> dict[str, list[int]]:
    """The global batch per epoch of the runs whose batches follow from the parameters alone: the static runs and
    the increasing and decreasing schedules (nbval compares them)."""
    return {label: batch_schedule(result) for label, result in runs.items()
            if kinds[label] == "static" or (kinds[label] == "class" and label in FIXED_SCHEDULES)}


def _median_times(race: pd.DataFrame, time_column: str) -> pd.Series:
    """Per run: the median over seeds of its time to the target (a seed that never reached it: inf)."""
    return race.assign(t=race[time_column].fillna(math.inf)).groupby("run", sort=False)["t"].median()


CHECKS = ("within_tolerance_of_best_static", "faster_than_median_static", "faster_than_every_class_schedule")


def _judge(ratios: Sequence[float], bound: float, *, strict: bool) -> tuple[str, dict]:
    """("pass" | "fail" | "within noise", seed band) for goodput-to-reference time ratios that pass at or below
    `bound` (below it when strict): with several seeds the band must lie wholly on one side to decide."""
    band = seed_band(ratios, against=bound)
    if band["side"] == "one seed":
        value = band["median"]
        return ("pass" if (value < bound if strict else value <= bound) else "fail"), band
    return {"below": "pass", "above": "fail", "within": "within noise"}[band["side"]], band


def goodput_verdict(race: pd.DataFrame, *, time_column: str = "emulated_s", tolerance: float = GOODPUT_TOLERANCE
                    ) -> dict:
    """The issue's pass/fail line on one kind of time (`time_column`), judged per seed: goodput's time to the
    target over the same seed's best static batch (the static run with the best median) must stay within
    `tolerance`, and over the seed's median static batch and every class schedule below 1. Each check passes when
    every seed's ratio does, fails when every seed's fails, and is "within noise" otherwise; the verdict's outcome
    is "passes", "fails" or "within noise"."""
    times = race.assign(t=race[time_column].fillna(math.inf)).pivot(index="seed", columns="run", values="t")
    medians = _median_times(race, time_column)
    kind = race.groupby("run", sort=False)["kind"].first()
    static = medians[kind == "static"]
    goodput_run = kind.index[kind == "goodput"][0]
    goodput = times[goodput_run]
    best = static.idxmin()
    classes = [name for name in medians.index if kind[name] == "class"]
    per_seed_median_static = times[static.index].median(axis=1)
    checks, bands = {}, {}
    checks[CHECKS[0]], bands["best_static"] = _judge(goodput / times[best], tolerance, strict=False)
    checks[CHECKS[1]], bands["median_static"] = _judge(goodput / per_seed_median_static, 1.0, strict=True)
    class_checks = {}
    for name in classes:
        class_checks[name], bands[name] = _judge(goodput / times[name], 1.0, strict=True)
    checks[CHECKS[2]] = ("fail" if "fail" in class_checks.values() else
                         "within noise" if "within noise" in class_checks.values() else "pass")
    outcome = ("fails" if "fail" in checks.values() else "within noise" if "within noise" in checks.values()
               else "passes")
    return {"time_column": time_column, "seeds": sorted(int(s) for s in race["seed"].unique()),
            "goodput_s": float(medians[goodput_run]), "best_static": best, "best_static_s": float(static[best]),
            "median_static_s": float(np.median(static.to_numpy())),
            "ratio_to_best_static": float(medians[goodput_run] / static[best]),
            "class_s": {name: float(medians[name]) for name in classes},
            **checks, "bands": bands, "outcome": outcome, "passed": outcome == "passes"}


def describe_race(race: pd.DataFrame, verdict: Mapping, *, target: float, regime: str) -> list[str]:
    """Sentences: the medians on one kind of time and the verdict, with every number it rests on. Seconds with two
    decimals (one from 10 s on): the emulated times are a few seconds."""
    def seconds(value: float) -> str:
        return format_seconds(value, decimals=2)

    seeds = verdict["seeds"]
    per_seed = race[race["kind"] == "goodput"].sort_values("seed")[verdict["time_column"]]
    classes = ("; the class study's schedules: " + ", ".join(f"{name} {seconds(t)}" for name, t in
                                                              verdict["class_s"].items()) if verdict["class_s"] else "")
    kind = race.groupby("run", sort=False)["kind"].first()
    variants = _median_times(race, verdict["time_column"])[kind == "variant"]
    others = "".join(f" {name}: {seconds(t)} ({t / verdict['best_static_s']:.2f}x the best static batch)."
                     for name, t in variants.items())
    return [f"{regime[0].upper()}{regime[1:]}, median over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}) of "
            f"the time to {target:g} test accuracy: goodput {seconds(verdict['goodput_s'])} (per seed: "
            f"{', '.join(seconds(t) for t in per_seed.fillna(math.inf))}); the best static batch "
            f"({verdict['best_static']}) {seconds(verdict['best_static_s'])}, so goodput took "
            f"{verdict['ratio_to_best_static']:.2f}x its time; the median static batch "
            f"{seconds(verdict['median_static_s'])}{classes}.",
            describe_verdict(verdict) + others]


def describe_verdict(verdict: Mapping) -> str:
    """The check's outcome in one sentence, with the parts that failed or that the seeds' spread cannot decide."""
    check = (f"the check (≤ {GOODPUT_TOLERANCE:g}x the best static batch, faster than the median static batch and "
             "than every class-study schedule, judged per seed)")
    named = {status: [name.replace("_", " ") for name in CHECKS if verdict[name] == status]
             for status in ("fail", "within noise")}
    band = verdict["bands"]["best_static"]
    spread = (f"; per seed goodput took {band['low']:.2f}–{band['high']:.2f}x the best static batch's time"
              if band["seeds"] > 1 else "; one seed, so no noise band: this verdict may not repeat")
    if verdict["outcome"] == "passes":
        return f"Goodput passes {check}{spread}."
    if verdict["outcome"] == "fails":
        noisy = f" (within noise: {', '.join(named['within noise'])})" if named["within noise"] else ""
        return f"Goodput does not pass {check}; it failed: {', '.join(named['fail'])}{noisy}{spread}."
    return (f"Whether goodput passes {check} is within the seeds' noise: {', '.join(named['within noise'])} held "
            f"in some seeds and not in others{spread}.")


def per_sample_cost(race_results: Mapping[tuple[str, int], RunResult], kinds: Mapping[str, str],
                    seed: int) -> pd.DataFrame:
    """Per static batch (one seed): measured CPU milliseconds per sample (training time / samples) and the
    emulated ones, each also relative to the smallest batch."""
    rows = []
    for (label, run_seed), result in race_results.items():
        if kinds[label] != "static" or run_seed != seed:
            continue
        epochs = with_emulated_time(result.epochs, result.steps)
        samples = float(epochs["samples"].sum())
        rows.append({"batch": int(result.config["initial_batch"]),
                     "cpu_ms_per_sample": 1000 * float(epochs["wall_s"].iloc[-1]) / samples,
                     "emulated_ms_per_sample": 1000 * float(epochs["emulated_s"].iloc[-1]) / samples})
    table = pd.DataFrame(rows).sort_values("batch").reset_index(drop=True)
    for column in ("cpu_ms_per_sample", "emulated_ms_per_sample"):
        table[column.replace("_ms_per_sample", "_cheaper_than_smallest")] = table[column].iloc[0] / table[column]
    return table


def describe_costs(costs: pd.DataFrame) -> str:
    largest = costs.iloc[-1]
    return (f"Why the regimes differ: per sample, B={int(largest['batch'])} is "
            f"{largest['cpu_cheaper_than_smallest']:.1f}x cheaper than B={int(costs['batch'].iloc[0])} on this CPU "
            f"(measured), against {largest['emulated_cheaper_than_smallest']:.1f}x on the emulated GPU-like cost, "
            "where a step's fixed cost dominates small batches. A larger batch pays only as far as it is cheaper per "
            "sample, so on this CPU little is gained by growing B.")


def describe_critical_batch(fit: CriticalBatchFit, noise_scale: float, *, target: float,
                            batches: Sequence[int]) -> list[str]:
    """The measured critical batch against the estimated noise scale, or why the sweep could not measure it."""
    if not math.isfinite(fit.critical_batch):
        return [f"The sweep could not measure a critical batch at {target:g} test accuracy: "
                f"{len(fit.batches)} of {len(batches)} static batches reached it "
                f"({', '.join(map(str, fit.batches)) or 'none'}), and a critical batch needs two or more whose steps "
                "still fall with B (a positive S_min)."]
    ratio = noise_scale / fit.critical_batch if math.isfinite(noise_scale) else math.nan
    return [f"From the static sweep ({', '.join(map(str, fit.batches))}), McCandlish's S = S_min (1 + B_crit/B) "
            f"gives a critical batch B_crit = {fit.critical_batch:.0f} samples at {target:g} test accuracy "
            f"(S_min = {fit.min_steps:.0f} steps, E_min = {fit.min_samples:.0f} samples). The noise scale the "
            f"estimator measured when the static runs reached the target, B_simple = {noise_scale:.0f}, is "
            f"{ratio:.2f}x that" + (": the proxy is within a factor of 2 of the direct measurement."
                                     if 0.5 <= ratio <= 2 else
                                     ": the proxy is off by more than a factor of 2 here (AI2's 2025 finding on "
                                     "language models was of this kind).")]


def batch_changes(steps: pd.DataFrame) -> list[tuple[int, int]]:
    """(step, global batch) at the first step and at every step where the global batch changed."""
    per_step = steps.groupby("step", sort=True)["global_batch"].first()
    changed = per_step[per_step.ne(per_step.shift())]
    return [(int(step), int(batch)) for step, batch in changed.items()]


def describe_choices(chosen: Mapping[str, RunResult], noise_scale: float, shown: int = 8) -> list[str]:
    """Per run: the batches it moved through (at which step), and where most of its samples were trained."""
    sentences = []
    for label, result in chosen.items():
        changes = batch_changes(result.steps)
        path = " → ".join(f"{b} (step {s})" for s, b in changes[:shown]) + (" → …" if len(changes) > shown else "")
        per_step = result.steps.groupby("step")["global_batch"].first()
        main = int(per_step.groupby(per_step).sum().idxmax())
        sentences.append(f"{label}: B {path}; most samples at B={main}.")
    if math.isfinite(noise_scale):
        sentences.append(f"For scale: the noise scale at the target was ~{noise_scale:.0f} samples. Goodput's short "
                         "visits to a neighbouring B are its exploration: a B it has not seen is tried for a few steps "
                         "and priced from measured step times, never extrapolated.")
    return sentences


def describe_noise(epochs: pd.DataFrame) -> list[str]:
    """How B_simple moved over each run, and how many steps gave no estimate (|G|² <= 0, counted, not clamped)."""
    sentences = []
    for run, part in epochs.groupby("run", sort=False):
        values = part["noise_scale"].dropna()
        if values.empty:
            continue
        missing, steps = int(part["noise_missing"].sum()), int(part["steps"].sum())
        sentences.append(f"{run}: {values.iloc[0]:.0f} → {values.iloc[-1]:.0f} (missing in {missing} of {steps} "
                         "steps)")
    if not sentences:
        return []
    firsts = epochs.groupby("run", sort=False)["noise_scale"].apply(lambda v: v.dropna().iloc[:2].mean())
    lasts = epochs.groupby("run", sort=False)["noise_scale"].apply(lambda v: v.dropna().iloc[-2:].mean())
    grew = int((lasts > firsts).sum())
    trend = (f"Over the last two epochs it was above the first two's in {grew} of {len(firsts.dropna())} runs"
             + (": it grows as training proceeds, as McCandlish et al. predict (later in training a larger batch "
                "stays efficient)." if grew > len(firsts.dropna()) / 2 else
                ": these runs are too short, or too noisy, to show the growth McCandlish et al. predict."))
    return ["B_simple per epoch, first → last: " + "; ".join(sentences) + ".", trend]
