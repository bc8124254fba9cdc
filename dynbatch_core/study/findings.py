"""Sentences from numbers, for the five class-study and heterogeneous notebooks: what a probe chose, who won a race
to an accuracy, how well balancers split a slow cluster. The notebooks print them and REPORT.md copies them from
each summary JSON (the adaptive notebook's own are in adaptive_findings.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from .analysis import (PRICED_TIME_PHRASE, ceiling_speedup, efficiency_table, fitted_step_time_table, run_labels,
                       seed_band, seeded_race, time_to_reach, timing_spread)

CLASS_STUDY = ("the class study (full datasets, ResNet-18/101 on GPUs) saw an accuracy dip on 1 GPU when the probe "
               "schedule dropped the batch back to 16, and on 4 GPUs found the decreasing and loss-based schedules "
               "fastest")
DIP_POINTS = 0.2  # a drop in test accuracy of at least this many percentage points counts as a dip


def format_seconds(value: float, decimals: int = 1) -> str:
    """A time in a sentence: "4.2 s", "42 s" (from 10 s on, one decimal fewer), "never" (not finite: never reached).
    Every sentence of the report writes seconds with it (the adaptive notebook's with decimals=2)."""
    if not math.isfinite(value):
        return "never"
    return f"{value:.{decimals if value < 10 else max(decimals - 1, 0)}f} s"


def _batches(values: Sequence[int]) -> str:
    """[16, 16, 32] -> '16 → 16 → 32'."""
    return " → ".join(str(int(v)) for v in values)


def _names(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def probe_outcome(epochs: pd.DataFrame, probe_sizes: Sequence[int]) -> dict:
    """What the probe did: the chosen batch, the test accuracy of the last probe epoch (acc_before) and of every
    epoch at the chosen batch (acc_after), and dip_points = how many percentage points the lowest of those fell
    below acc_before (negative: it never fell)."""
    probes = min(len(probe_sizes), len(epochs))
    outcome = {"probe_epochs": probes, "chosen_batch": None, "dropped": False, "dip_points": None}
    if len(epochs) > probes:
        before, after = epochs.iloc[probes - 1], epochs.iloc[probes:]
        outcome.update(chosen_batch=int(after["global_batch"].iloc[0]),
                       dropped=bool(after["global_batch"].iloc[0] < before["global_batch"]),
                       acc_before=round(float(before["test_acc"]), 4),
                       acc_after=[round(float(acc), 4) for acc in after["test_acc"]],
                       dip_points=round(100 * (before["test_acc"] - after["test_acc"].min()), 2))
    return outcome


def describe_probe(epochs: pd.DataFrame, probe_sizes: Sequence[int]) -> tuple[list[str], list[str]]:
    """(findings, comparison with the class study) for one probe run's epochs table."""
    outcome = probe_outcome(epochs, probe_sizes)
    probes = outcome["probe_epochs"]
    probe_part = epochs.iloc[:probes]
    first, last = epochs.iloc[0], epochs.iloc[-1]
    findings = [f"The probe ran one epoch at each global batch {_batches(probe_part['global_batch'])} "
                f"({format_seconds(probe_part['wall_s'].iloc[-1])} of training)"
                + (f", then kept B = {outcome['chosen_batch']} for the remaining {len(epochs) - probes} epoch(s)."
                   if outcome["chosen_batch"] else "; the run ended before it chose a batch."),
                f"Test accuracy went from {first['test_acc']:.3f} after the first epoch to {last['test_acc']:.3f} "
                f"after {len(epochs)} epochs and {format_seconds(last['wall_s'])} of training."]
    if outcome["chosen_batch"] is None:
        return findings, []
    rates = probe_part["schedule_score"].tolist()   # what the probe scored each epoch (epochs.csv)
    findings.append("Its rule, the fastest fall of ln(training loss) per second of epoch, scored them "
                    + ", ".join(f"{int(b)}: {1000 * r:.2f}" for b, r in zip(probe_part["global_batch"], rates))
                    + " (per 1000 s)" + ("; the first probe's score includes the steep start of training."
                                         if rates and max(rates) == rates[0] else "."))
    path = " → ".join(f"{acc:.3f}" for acc in [outcome["acc_before"], *outcome["acc_after"]])
    dipped = outcome["dip_points"] >= DIP_POINTS
    verdict = (f"a dip of {outcome['dip_points']:.1f} points" if dipped else
               f"no dip (never more than {DIP_POINTS} points below {outcome['acc_before']:.3f})")
    if outcome["dropped"]:
        findings.append(f"When the batch dropped from {int(probe_part['global_batch'].iloc[-1])} back to "
                        f"{outcome['chosen_batch']}, test accuracy went {path} over the epochs that followed: "
                        f"{verdict}.")
        comparison = [("Like" if dipped else "Unlike") + " the class study's 1-GPU probe, which dipped when the "
                      f"batch dropped back to 16: here the probe chose {outcome['chosen_batch']} and test accuracy "
                      f"went {path} after the drop ({verdict})."]
    else:
        findings.append(f"The chosen batch is not smaller than the last probe's, so there was no drop back to a "
                        f"small batch; test accuracy went {path} from the last probe epoch on.")
        comparison = [f"The class study's dip came with the drop back to B = 16; here the probe chose "
                      f"{outcome['chosen_batch']}, so that situation did not arise."]
    return findings, comparison


def timing_noise(epochs: pd.DataFrame, threshold: float = 1.2) -> tuple[float, str | None]:
    """(spread, sentence): the largest ratio of median samples/s between runs at a global batch every run used
    (1.0 when none is shared: analysis.timing_spread), and a sentence about it when it exceeds `threshold`."""
    timing = timing_spread(epochs)
    if timing is None:
        return 1.0, None
    return timing["spread"], _timing_sentence(timing, threshold)


def _timing_sentence(timing: dict | None, threshold: float = 1.2) -> str | None:
    if timing is None or timing["spread"] <= threshold:
        return None
    return (f"Timing noise: at B = {timing['batch']}, which every run used, the runs' median throughput ranged from "
            f"{timing['low']:.0f} ({timing['low_run']}) to {timing['high']:.0f} samples/s ({timing['high_run']}): "
            f"other work shared the CPU, so time ratios between runs below about {timing['spread']:.1f}× are within "
            "this noise.")


def describe_accuracy_race(epochs: pd.DataFrame, *, noise: bool = True) -> list[str]:
    """Final accuracies and the time each run needed to reach the lowest of them; noise: add `timing_noise`'s
    sentence (only meaningful when runs with the same global batch should run equally fast)."""
    finals = epochs.groupby("run", sort=False).tail(1).set_index("run")
    findings = ["Global batch per epoch: " + "; ".join(
        f"{run} {_batches(epochs.loc[epochs['run'] == run, 'global_batch'])}" for run in finals.index) + "."]
    findings.append("Final test accuracy: " + ", ".join(
        f"{run} {row.test_acc:.3f} after {format_seconds(row.wall_s)}" for run, row in finals.iterrows()) + ".")
    if len(finals) > 1:
        target = float(finals["test_acc"].min())
        reach = time_to_reach(epochs, "test_acc", target, lower_is_better=False).sort_values("time_s")
        findings.append(f"To reach {target:.3f} (the lowest final accuracy) took " + ", ".join(
            f"{row.run} {format_seconds(row.time_s)}" for row in reach.itertuples()) +
            f": {reach['run'].iloc[0]} was {reach['time_s'].iloc[-1] / reach['time_s'].iloc[0]:.2f}× faster "
            f"than {reach['run'].iloc[-1]}.")
    sentence = timing_noise(epochs)[1] if noise else None
    return findings + ([sentence] if sentence else [])


def describe_schedule_race(race: dict) -> tuple[list[str], list[str]]:
    """(findings, comparison with the class study) for analysis.schedule_race's numbers: the time each schedule
    took to the target loss, and why the fastest won (fewer samples, or faster processing of them)."""
    reach, by_samples = race["reach"], race["by_samples"]
    fastest, slowest = reach.iloc[0], reach.iloc[-1]
    priced = race["time_column"] == "priced_s"
    findings = [f"Time to reach training loss {race['target']:.3g} (the highest final loss, so every run reaches it)"
                + (f" on {PRICED_TIME_PHRASE}" if priced else "") + ": "
                + ", ".join(f"{row.run} {format_seconds(row.time_s)}" for row in reach.itertuples()) + "."]
    if priced:
        findings.append("On the wall clock, which other work on the machine moves: " + ", ".join(
            f"{run} {format_seconds(race['wall_s'][run])}" for run in reach["run"]) + ".")
    findings.append("Global batch per epoch: " + "; ".join(
        f"{run} {_batches(batches)}" for run, batches in race["batches"].items()) + ".")
    reason = {"samples": "fewer samples", "rate": "faster processing of samples"}[race["decided_by"]]
    findings.append(f"{fastest.run} beat {slowest.run} by {race['time_ratio']:.2f}×: it needed "
                    f"{fastest.samples:.0f} samples instead of {slowest.samples:.0f} ({race['sample_ratio']:.2f}×) at "
                    f"{fastest.rate:.0f} instead of {slowest.rate:.0f} samples/s ({race['rate_ratio']:.2f}×), so "
                    f"mostly {reason}.")
    by_batch = race["median_rate"]
    if len(by_batch) > 1:
        small, large = by_batch.iloc[0], by_batch.iloc[-1]
        throughput = (f"median {small:.0f} samples/s at B = {by_batch.index[0]} vs {large:.0f} at "
                      f"B = {by_batch.index[-1]}")
        if large > 1.2 * small:
            findings.append(f"Large batches are faster per sample here ({throughput}): a schedule that spends its "
                            "early epochs, where the loss falls fastest, at large batches gains time there; one "
                            "that starts small pays for it, unless its extra updates per sample make up for it.")
        else:
            findings.append(f"Large batches are hardly faster per sample here ({throughput}), so the schedules "
                            "differ mainly in how much the loss falls per sample, where smaller batches (more "
                            "updates) tend to win early in training.")
    noise = _timing_sentence(race["timing"])
    if noise:
        findings.append(noise)
    findings.append("Samples needed to reach it (not affected by timing noise): " + ", ".join(
        f"{row.run} {row.samples:.0f}" for row in by_samples.itertuples()) + ".")
    expected, two_first = race["expected_fastest"], race["two_first"]
    if race["ranked_by"] == "samples":
        comparison = [f"This run cannot rank the schedules by time: all reached the target within "
                      f"{race['time_ratio']:.2f}× of each other, inside the {race['spread']:.1f}× timing noise. By "
                      f"samples needed, the two most efficient were {_names(two_first)}, "
                      + ("the same two the class study found fastest." if race["agree"] else
                         f"not the class study's two fastest ({_names(expected)}).")]
    else:
        comparison = [f"{'As in' if race['agree'] else 'Unlike'} the class study (4 GPUs: {_names(expected)} "
                      f"fastest), the two fastest here were {_names(two_first)}; {fastest.run} won mostly through "
                      f"{reason}."]
    if not race["agree"]:
        gain = (f" (here B = {by_batch.index[-1]} ran only {by_batch.iloc[-1] / by_batch.iloc[0]:.1f}× faster per "
                f"sample than B = {by_batch.index[0]})" if len(by_batch) > 1 else "")
        comparison.append("Two likely reasons for the difference: on GPUs a large batch is far cheaper per sample than on these CPU "
                          f"ranks{gain}, which favours starting large; and the class study's loss-based rule, as "
                          "its seed computed P (without the 1/k, see schedules.LossPlateauSchedule), never saw a "
                          "plateau and only ever halved B, so it behaved like decreasing.")
    return findings, comparison


def describe_band(band: dict, what: str, *, against: float = 1.0) -> str:
    """'<what> 1.38× (median over 3 seeds; their range 1.21–1.52 ...)' with the verdict the band supports."""
    spread = f"{band['low']:.2f}–{band['high']:.2f}"
    verdict = {"one seed": "one seed, so no noise band to tell a difference from noise",
               "within": f"the seeds' range {spread} holds {against:g}: no difference within the seeds' noise",
               "above": f"the seeds' range {spread} lies above {against:g}: every seed agrees, a difference",
               "below": f"the seeds' range {spread} lies below {against:g}: every seed agrees, a difference"}
    median = "" if band["seeds"] == 1 else f"median over {band['seeds']} seeds; "
    return f"{what} {band['median']:.2f}× ({median}{verdict[band['side']]})"


def describe_seeded_race(race: pd.DataFrame, baseline: str, *, time_phrase: str) -> tuple[list[str], dict]:
    """Sentences and {run: seed band} for analysis.seeded_race's table: each run's speed-up over `baseline` in
    reaching each seed's target accuracy, judged by the seeds' spread. time_phrase: what the times are, as the
    sentence names them ("the wall clock", analysis.PRICED_TIME_PHRASE)."""
    seeds = sorted(race["seed"].unique())
    medians = race.groupby("run", sort=False)["time_s"].median().sort_values()
    bands = {run: seed_band(part["speedup"]) for run, part in race.groupby("run", sort=False) if run != baseline}
    over = f"median over seeds {', '.join(str(s) for s in seeds)}" if len(seeds) > 1 else f"seed {seeds[0]}"
    sentences = [f"Time to the test accuracy every run of a seed reached (the lowest of their best) on {time_phrase} "
                 f"({over}): "
                 + ", ".join(f"{run} {format_seconds(t)}" for run, t in medians.items()) + "."]
    sentences += [describe_band(band, f"{run} over {baseline}:") + "." for run, band in bands.items()]
    return sentences, bands


def describe_seeded_accuracy_race(epochs: pd.DataFrame, baseline: str, *, first_seed: int,
                                  time_column: str = "wall_s") -> tuple[list[str], dict]:
    """Sentences and {run: seed band} for a race to accuracy repeated per seed (epochs: run and seed columns): the
    batches and final accuracies of `first_seed`'s runs, then describe_seeded_race's on `time_column`; on priced
    time (priced_s) the seed bands on the wall clock follow, which other work on the machine moves."""
    priced = time_column == "priced_s"
    sentences, bands = describe_seeded_race(seeded_race(epochs, baseline, time_column=time_column), baseline,
                                            time_phrase=PRICED_TIME_PHRASE if priced else "the wall clock")
    sentences = describe_accuracy_race(epochs[epochs["seed"] == first_seed], noise=False)[:2] + sentences
    if priced:
        wall = describe_seeded_race(seeded_race(epochs, baseline), baseline, time_phrase="the wall clock")[0]
        sentences.append("On the wall clock, which other work on the machine moves: " + " ".join(wall[1:]))
    return sentences, bands


def describe_seeded_speedups(epochs: pd.DataFrame, baseline: str = "equal") -> tuple[list[str], dict]:
    """Sentence and {run: seed band} for each run's last-epoch samples/s over `baseline`'s, per seed (epochs needs
    run and seed columns; the last epoch, so that dbs is measured after its first re-split)."""
    last = epochs.sort_values("epoch").groupby(["seed", "run"], sort=False).tail(1)
    rates = last.pivot(index="seed", columns="run", values="samples_per_s")
    bands = {run: seed_band(rates[run] / rates[baseline]) for run in run_labels(epochs) if run != baseline}
    return ([f"Last-epoch throughput over {baseline}: "
             + "; ".join(describe_band(band, run) for run, band in bands.items()) + "."], bands)


def last_full_split(steps: pd.DataFrame) -> dict[str, list[int]]:
    """Per run: the per-rank batches of the last step of the last epoch that held the full global batch."""
    splits = {}
    for run, part in steps.groupby("run", sort=False):
        part = part[part["epoch"] == part["epoch"].max()]
        full = part[part["global_batch"] == part["global_batch"].max()]
        last_step = full[full["step"] == full["step"].max()].sort_values("rank")
        splits[run] = [int(b) for b in last_step["rank_batch"]]
    return splits


def describe_balancing(steps: pd.DataFrame, speedups: pd.DataFrame, slowdown: Sequence[float],
                       emulated_sample_ms: float | None = None) -> dict[str, list[str]]:
    """Sentences for the heterogeneous notebook's rank_batches, balance_efficiency and speedup figures."""
    speeds = [1.0 / k for k in slowdown]
    ideal = [round(s / sum(speeds), 2) for s in speeds]
    splits = [f"{run} {split}" for run, split in last_full_split(steps).items()]
    efficiency = efficiency_table(steps)
    last_epoch = efficiency[efficiency["epoch"] == efficiency.groupby("run")["epoch"].transform("max")]
    mean_eff = last_epoch.groupby("run", sort=False)["efficiency"].mean()
    equal_eff = sum(slowdown) / (len(slowdown) * max(slowdown))
    balanced = speedups[speedups["balancer"] != "equal"]
    at_main = balanced[balanced["slowest"] == max(slowdown)]
    speedup = [f"At slowdown {list(slowdown)} the ceiling is {ceiling_speedup(slowdown):.2f}×; measured on the last "
               "epoch: " + ", ".join(f"{row.balancer} {row.speedup:.2f}× ({100 * row.speedup / row.ceiling:.0f} % "
                                     "of it)" for row in at_main.itertuples()) + "."]
    swept = balanced[balanced["slowest"] > 1]
    if swept["slowest"].nunique() > 1:
        share = (swept["speedup"] / swept["ceiling"]).groupby(swept["balancer"], sort=False).mean()
        speedup.append(f"Over k = {', '.join(f'{k:g}' for k in sorted(swept['slowest'].unique()))} they reached on "
                       "average " + ", ".join(f"{name} {100 * value:.0f} %" for name, value in share.items())
                       + " of the ceiling.")
    if emulated_sample_ms:
        speedup.append(f"Compute was emulated at {emulated_sample_ms:g} ms per sample × k (emulated_sample_ms), so "
                       "the cost per sample is fixed and other work on this shared CPU cannot decide the comparison; "
                       "data loading, all-reduce and optimizer steps are real and keep results a little below the "
                       "ceiling.")
    else:
        speedup.append("Compute was real: on a CPU the cost per sample falls with the batch, so the fast rank's "
                       "larger slice can take a balancer past the ceiling, and other work on the machine adds noise.")
    return {
        "rank_batches": [f"With slowdown {list(slowdown)}, the speed-proportional shares are {ideal}; the split at the "
                         "last full step was " + ", ".join(splits) + ". DBS re-splits once per epoch (its first "
                         "epoch is equal), PID every few steps."],
        "balance_efficiency": ["Mean balance efficiency in the last epoch: " + ", ".join(
            f"{run} {value:.2f}" for run, value in mean_eff.items()) +
            f" (an equal split of these slowdowns gives {equal_eff:.2f} in theory, a perfect split 1)."],
        "speedup": speedup,
    }


def describe_fit(steps: pd.DataFrame) -> list[str]:
    """Sentences for the fitted-step-time figure: how closely the model balancer's lines predict each rank."""
    table = fitted_step_time_table(steps)
    if table.empty:
        return ["No run used the model balancer."]
    last = table[table["step"] == table["step"].max()].sort_values("rank")
    lines = ", ".join(f"rank {row.rank}: {1000 * row.model_a_s:.1f} ms + {1000 * row.model_c_s:.2f} ms × b"
                      for row in last.itertuples())
    later = table[table["step"] >= table["step"].max() // 2]
    error = ((later["compute_s"] - later["fitted_s"]).abs() / later["compute_s"].clip(lower=1e-9)).median()
    return [f"Final fitted lines {lines}. Over the second half of the run the fitted time was off the measured one "
            f"by a median {100 * error:.1f} % per step."]
