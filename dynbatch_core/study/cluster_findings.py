"""Sentences from the cluster notebook's numbers, one function per figure, and the headline REPORT.md opens the
notebook's section with (the model-vs-pid answer with its band, the scaling numbers).

    describe_engine(cluster_validation.engine_agreement(engine.table))     # -> sentences
    describe_noise(cluster_study.noise_bands(noise.table), cluster_study.paired_ratio(noise.table, "model", "pid"))
    headline(model_vs_pid, scaling.table)
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import pandas as pd

from .cluster_study import SCENARIO_NAMES
from .findings import format_seconds


def _names(items: Sequence[str]) -> str:
    items = list(items)
    return "none" if not items else items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _percent(value: float) -> str:
    return f"{100 * value:g} %"


def _level(cv: float, spike_prob: float) -> str:
    return f"CV {_percent(cv)}" + (f" + spikes {_percent(spike_prob)}" if spike_prob else "")


def describe_engine(agreement: pd.DataFrame) -> list[str]:
    """The engine validation's verdict from engine_agreement's table."""
    cells, differing = int(agreement["cells"].sum()), int(agreement["differing"].sum())
    runs = ", ".join(f"{row.scenario} {row.balancer}" for row in agreement.itertuples())
    sentence = (f"Simulated on the engine runs' emulated costs, the simulator split {cells - differing} of the "
                f"{cells} (step, rank) cells of {len(agreement)} engine runs ({runs}) as the engine did: "
                f"{differing} differ")
    worst = float(agreement["max_compute_diff_s"].max())
    sentences = [sentence + f", and every compute time matches to {worst:.1e} s."]
    if differing:
        wrong = agreement[agreement["differing"] > 0]
        sentences.append("Differing cells in " + ", ".join(f"{row.scenario} {row.balancer} ({row.differing})"
                                                           for row in wrong.itertuples()) + ".")
    return sentences


def _range(values: pd.Series, fmt: str) -> str:
    values = values.dropna()
    if values.empty:
        return "never"
    low, high = values.min(), values.max()
    return format(low, fmt) if low == high else f"{format(low, fmt)}–{format(high, fmt)}"


def describe_real_validation(table: pd.DataFrame, extra: Mapping, source: str) -> list[str]:
    """real_validations' table and extra: per calibration, the calibrated costs, then per balancer the simulated
    seeds against the real repeats not calibrated on."""
    if source == "stand-in":
        sentences = ["No recorded real repeats were found, so the 'real' runs here are a stand-in simulated from "
                     "profiles.MEASURED['cpu-here'] (the calibration of this machine's real [1,3] runs): this "
                     "checks that calibrating on one run reproduces the others, not the simulator against reality."]
    else:
        sentences = [f"Real repeats from {source.removeprefix('recorded ')}."]
    for calibrate_on, calibrated in extra["by_calibration"].items():
        sentences += _describe_calibration(table[table["calibrate_on"] == calibrate_on], calibrated)
    if len(extra["by_calibration"]) > 1:
        steps_ms = {on: _balanced_step_ms(calibrated) for on, calibrated in extra["by_calibration"].items()}
        sentences.append("At their equal-time splits the calibrations predict a slowest-rank compute of "
                         + ", ".join(f"{ms:.1f} ms ({on}'s repeat 0)" for on, ms in steps_ms.items())
                         + ": a calibration carries the pace of the run it was fitted on.")
    first = next(iter(extra["by_calibration"].values()))
    sentences.append(f"Settle steps: the first of {first['settle_hold']} steps in a row with every rank within "
                     f"{100 * first['tolerance']:.0f} % of B/N of the calibrated costs' equal-time split.")
    return sentences


def _where(value: float, reference: pd.Series) -> str:
    """Where `value` lies against the range of `reference` (NaN dropped), in words."""
    reference = reference.dropna()
    if reference.empty or pd.isna(value):
        return "nothing to compare"
    low, high = reference.min(), reference.max()
    return ("inside their range" if low <= value <= high else
            f"{100 * (value / high - 1):.1f} % above their highest" if value > high else
            f"{100 * (1 - value / low):.1f} % below their lowest")


def _balanced_step_ms(calibrated: Mapping) -> float:
    """The slowest rank's predicted compute at the calibration's equal-time split, in ms."""
    costs, slowdown = calibrated["costs"], calibrated["fields"]["slowdown"]
    return max((row.a_ms + row.c_ms * b) * k
               for row, b, k in zip(costs.itertuples(), calibrated["ideal_split"], slowdown))


def _describe_calibration(table: pd.DataFrame, extra: Mapping) -> list[str]:
    costs = extra["costs"]
    lines = "; ".join(f"rank {row.rank} a = {row.a_ms:.1f} ms, c = {row.c_ms:.2f} ms/sample, CV {row.cv:.3f}, "
                      f"{100 * row.spike_prob:.1f} % spikes of {row.spike_factor:.2f}×" for row in costs.itertuples())
    split = ", ".join(f"{b:.1f}" for b in extra["ideal_split"])
    sentences = [f"Calibrated on {extra['calibrate_on']} repeat 0 (slowdown divided out): {lines}; "
                 f"{1000 * extra['overhead_s']:.1f} ms a step beyond the slowest rank's compute; the equal-time "
                 f"split of these costs at k = {list(extra['fields']['slowdown'])} is [{split}]."]
    for balancer, part in table.groupby("balancer", sort=False):
        real = part[(part["source"] == "real") & ~part["calibration"]]
        simulated = part[part["source"] == "simulated"]
        median = simulated["throughput"].median()
        sentence = (f"{balancer}: simulated steady throughput {median:.0f} samples/s (median of {len(simulated)} "
                    f"seeds, range {_range(simulated['throughput'], '.0f')})")
        if real.empty:
            sentences.append(sentence + f", settle steps {_range(simulated['settle_steps'], '.0f')}; no real repeat "
                             "of it besides the one calibrated on, so nothing to compare with.")
            continue
        real_median = real["throughput"].median()
        where = _where(median, real["throughput"])
        settle_median = simulated["settle_steps"].median()
        never = int(real["settle_steps"].isna().sum())
        sentences.append(
            sentence + f" against the real repeats' median {real_median:.0f} ({100 * (median / real_median - 1):+.1f} "
            f"%), range {_range(real['throughput'], '.0f')} ({len(real)} repeat{'s' if len(real) > 1 else ''}): "
            f"{where}; settle steps simulated median {settle_median:.0f} (range "
            f"{_range(simulated['settle_steps'], '.0f')}), real {_range(real['settle_steps'], '.0f')}"
            + (f" (never settled: {never} of the real repeats)" if never else "") + ": "
            + _where(settle_median, real["settle_steps"]) + ".")
    return sentences


def describe_scaling(table: pd.DataFrame) -> list[str]:
    """Per scenario: the ceiling and each balancer's speed-up at the smallest and largest N it ran at."""
    sentences = []
    for name, part in table.groupby("scenario", sort=False):
        sizes = sorted(part["world_size"].unique())
        ceilings = part.drop_duplicates("world_size").set_index("world_size")["ceiling"]
        ceiling = (f"ceiling {ceilings.iloc[0]:.2f}× at every N" if ceilings.max() - ceilings.min() < 0.005 else
                   "ceiling " + ", ".join(f"{ceilings[n]:.2f}× at N = {n}" for n in (sizes[0], sizes[-1])))
        parts = []
        for balancer, mine in part[part["balancer"] != "equal"].groupby("balancer", sort=False):
            mine = mine.sort_values("world_size")
            first, last = mine.iloc[0], mine.iloc[-1]
            parts.append(f"{balancer} {first.speedup:.2f}× at N = {first.world_size} ({100 * first.fraction:.0f} % "
                         f"of the ceiling) to {last.speedup:.2f}× at N = {last.world_size} "
                         f"({100 * last.fraction:.0f} %)")
        label = SCENARIO_NAMES.get(name, name).format(k=3)
        sentences.append(f"{label[0].upper() + label[1:]}: {ceiling}; " + "; ".join(parts) + ".")
    sentences.append("Ceiling: the equal split's noiseless step time over the equal-time split's; for ranks that "
                     "differ only in k it is mean(speed) / min(speed), for the generation mix it comes from the "
                     "cards' costs (a + c_i b_i equal on every card). Noise keeps every balancer a little under it: "
                     "a step waits for its slowest draw.")
    return sentences


def describe_communication(table: pd.DataFrame, world_size: int) -> list[str]:
    first, last = table["ratio"].min(), table["ratio"].max()
    parts = []
    for balancer, part in table[table["balancer"] != "equal"].groupby("balancer", sort=False):
        part = part.sort_values("ratio")
        parts.append(f"{balancer} {part['speedup'].iloc[0]:.2f}× → {part['speedup'].iloc[-1]:.2f}×")
    ceilings = table.drop_duplicates("ratio").sort_values("ratio")["ceiling"]
    return [f"Half the ranks 3× slow at N = {world_size}: as the exposed reduction grows from {first:.2f} to "
            f"{last:.2f} × the equal split's step compute, the speed-up over equal falls: " + ", ".join(parts)
            + f" (ceiling {ceilings.iloc[0]:.2f}× → {ceilings.iloc[-1]:.2f}×). Balancing shortens only the compute "
            "part of a step; the reduction every rank waits for stays."]


def describe_noise(bands: pd.DataFrame, model_vs_pid: pd.DataFrame) -> list[str]:
    """Per N: each balancer's median speed-up at the quietest and the noisiest level; then model against pid."""
    sentences = []
    for n, part in bands.groupby("world_size", sort=True):
        levels = part.drop_duplicates(["cv", "spike_prob"]).sort_values(["spike_prob", "cv"])
        quiet, loud = levels.iloc[0], levels.iloc[-1]
        seeds = int(part["seeds"].max())
        parts = []
        for balancer, mine in part[part["balancer"] != "equal"].groupby("balancer", sort=False):
            at = mine.set_index(["cv", "spike_prob"])
            q, l = at.loc[(quiet.cv, quiet.spike_prob)], at.loc[(loud.cv, loud.spike_prob)]
            parts.append(f"{balancer} {q['median']:.2f}× ({q['low']:.2f}–{q['high']:.2f}) → {l['median']:.2f}× "
                         f"({l['low']:.2f}–{l['high']:.2f})")
        sentences.append(f"N = {n}, speed-up over equal at {_level(quiet.cv, quiet.spike_prob)} → "
                         f"{_level(loud.cv, loud.spike_prob)} (median, 10th–90th percentile over {seeds} seeds): "
                         + ", ".join(parts) + ".")
    sentences.append(describe_model_vs_pid(model_vs_pid))
    return sentences


def model_vs_pid_verdict(ratios: pd.DataFrame) -> dict:
    """Counts of the noise levels where model's band over pid lies above 1, below, or holds 1; and the answer."""
    sides = ratios["side"].value_counts().to_dict() if not ratios.empty else {}
    above, below, within = (int(sides.get(side, 0)) for side in ("above", "below", "within"))
    answer = ("no model runs" if ratios.empty else
              "yes: at no level is model's band below pid's" if not below else
              "no: at some levels pid is faster for every decile of seeds")
    return {"levels": len(ratios), "above": above, "below": below, "within": within, "answer": answer,
            "median_low": float(ratios["median"].min()) if len(ratios) else math.nan,
            "median_high": float(ratios["median"].max()) if len(ratios) else math.nan}


def describe_model_vs_pid(ratios: pd.DataFrame) -> str:
    if ratios.empty:
        return "Model did not run at these sizes (model_max_ranks), so model against pid is not decided here."
    verdict = model_vs_pid_verdict(ratios)
    arrows = {"above": " ↑", "below": " ↓", "within": ""}
    levels = "; ".join(
        f"N = {row.world_size} {_level(row.cv, row.spike_prob)} {row.median:.3f} [{row.low:.3f}–{row.high:.3f}]"
        f"{arrows[row.side]}" for row in ratios.itertuples())
    return (f"Is model ≥ pid? Model's throughput over pid's at the same seed (the same noise draws), median "
            f"[10th–90th percentile]: {levels}. The band lies above 1 (model faster) at {verdict['above']} of "
            f"{verdict['levels']} levels, below 1 (pid faster) at {verdict['below']}, and holds 1 (no difference "
            f"beyond the seeds' spread) at {verdict['within']}: model ≥ pid — {verdict['answer']}.")


def short_model_vs_pid(ratios: pd.DataFrame) -> str:
    """describe_model_vs_pid in one sentence: the range of medians and bands, and the levels where a band is clear
    of 1."""
    if ratios.empty:
        return describe_model_vs_pid(ratios)
    verdict = model_vs_pid_verdict(ratios)
    sizes = ", ".join(str(n) for n in sorted(ratios["world_size"].unique()))
    clear = "; ".join(f"{'above' if row.side == 'above' else 'below'} at N = {row.world_size} "
                      f"{_level(row.cv, row.spike_prob)} ({row.median:.3f} [{row.low:.3f}–{row.high:.3f}])"
                      for row in ratios.itertuples() if row.side != "within")
    seeds = int(ratios["seeds"].min())
    return (f"Is model ≥ pid? Over {verdict['levels']} noise levels (N = {sizes}; {seeds}+ seeds each, paired by "
            f"seed) model's throughput over pid's had medians {verdict['median_low']:.3f}–"
            f"{verdict['median_high']:.3f}, and its 10th–90th percentile band lay clear of 1 at "
            f"{verdict['above'] + verdict['below']} of them ({clear or 'none'}) and held 1 at the other "
            f"{verdict['within']}: {verdict['answer']}.")


def describe_settle(table: pd.DataFrame, extra: Mapping, slow_factor: float) -> list[str]:
    """settle_study's table and extra (change_step, tolerance), per balancer and N."""
    change_step, tolerance = extra["change_step"], extra["tolerance"]
    parts = []
    for balancer, part in table.groupby("balancer", sort=False):
        part = part.sort_values("world_size")
        steps = ", ".join(("never" if math.isnan(s) else f"{s:.0f}") + f" at N = {n}"
                          for n, s in zip(part["world_size"], part["settle_steps"]))
        parts.append(f"{balancer} {steps}")
    return [f"Half the ranks go from k = 1 to {slow_factor:g} at step {change_step}; steps until every rank's batch "
            f"stays within {100 * tolerance:g} % of B/N of the new equal-time split: " + "; ".join(parts)
            + ". dbs re-splits only at an epoch's end, so it waits for the next one (equal never moves: left out)."]


def describe_planning(table: pd.DataFrame) -> list[str]:
    new, old = table["new_card"].iloc[0], table["old_card"].iloc[0]
    most = table["added"].max()
    at_most = table[table["added"] == most].set_index("balancer")
    without = table.loc[table["added"] == table["added"].min(), "epoch_s"].min()
    worth = [b for b, row in at_most.iterrows() if row["vs_without"] > 1]
    best = at_most["epoch_s"].idxmin()
    ideal = float(without / at_most["ideal_epoch_s"].iloc[0])
    parts = ", ".join(f"{b} {format_seconds(row['epoch_s'], 2)} ({row['vs_without']:.2f}×)"
                      for b, row in at_most.iterrows())
    sentences = [f"An epoch on {int(table['new_count'].iloc[0])} × {new} alone takes {format_seconds(without, 2)}; "
                 f"with {most} × {old} added: {parts} (× = faster than without them; the noiseless equal-time split "
                 f"would give {ideal:.2f}×)."]
    equal = table[table["balancer"] == "equal"].sort_values("added")
    if not equal.empty and (equal["vs_without"].iloc[1:] < 1).all():
        sentences.append(f"With the equal split every added {old} makes the fast cards wait: the epoch is slower "
                         f"than without them at every count ({_names([str(a) for a in equal['added'].iloc[1:]])}).")
    sentences.append(f"Adding them pays with {_names(worth)}; the most with {best}, "
                     f"{100 * (at_most.loc[best, 'vs_without'] - 1):.0f} % faster per epoch.")
    return sentences


def headline(model_vs_pid: pd.DataFrame, scaling: pd.DataFrame) -> list[str]:
    """What REPORT.md states first: the model-vs-pid answer with its band, and the scaling numbers at the largest N."""
    sentences = [short_model_vs_pid(model_vs_pid)]
    largest = scaling[scaling["balancer"] != "equal"]
    parts = []
    for name, part in largest.groupby("scenario", sort=False):
        top = part[part["world_size"] == part["world_size"].max()]
        parts.append(f"{SCENARIO_NAMES.get(name, name).format(k=3)} at N = {int(top['world_size'].iloc[0])}: "
                     + ", ".join(f"{row.balancer} {row.speedup:.2f}× ({100 * row.fraction:.0f} % of "
                                 f"{row.ceiling:.2f}×)" for row in top.itertuples()))
    sentences.append("Scaling (speed-up over equal, share of the ceiling): " + "; ".join(parts) + ".")
    return sentences
