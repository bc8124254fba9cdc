"""The cost-model balancer against pid and the oracle: the best fixed split, found by sweeping it in the same run.

    python benchmarks/cost_model.py                  # everything, ~12 min on 2 shared CPU cores
    python benchmarks/cost_model.py --only emulated  # the noise-free check alone (~1 min)

Parts (MNIST, resnet8, global batch 128, one invocation, runs interleaved so machine load hits all alike):
  real [1,3]        2 ranks, rank 1 three times slower, real timing. First the sweep: fixed splits b_1 = 24..34
                    (weights balancer) around the speed-proportional 32, --repeats times; the oracle is the fixed
                    split with the best median over the sweep. Then the race: model, pid and the oracle's split run
                    side by side, --race-repeats times (order rotated). The race's runs of the oracle are the
                    yardstick: the sweep's best median is the luckiest of several noisy medians, inflated by picking.
  real [1,1,2,4]    4 ranks on 2 cores, the same with fixed splits from min-max splits of lines (alpha + b) k_i,
                    alpha = 0..24 samples of fixed cost, and equal [1,1,1,1] (the noise floor of balance efficiency).
  trace 1→3→1       2 ranks, rank 1 slows to 3x at step 32 and recovers at 64, real timing: model and pid.
  emulated          --emulated-sample-ms 2 --emulated-step-ms 10 (no timing noise), [1,3] and [1,1,2,4]: the model
                    must land on the exact optimal integer split of the true lines (10 + 2 b) k_i ms and stay.
Ratios are paired: model / oracle and model / pid within each race repeat (runs a few seconds apart), their
median and range over the repeats ("above" / "below" 1 when every repeat agrees, else "within" the noise).
Per run: steady samples/s over the second half of its steps (sum of global batches / sum of step times, a step
lasting its slowest rank's compute + wait), the step after which every rank's batch stays within 1 sample of the
run's final split ("settle"), the largest swing of a rank's batch after that in samples ("swing"), balance efficiency.
Timing resolution (from the [1,3] sweep): how many steps at one split it takes this machine's timing to place the
balance point within +-1 sample (timing_resolution), against which settling and "model >= pid" can be judged.
Writes outputs/benchmarks/cost_model_{runs,summary,resolution}.csv and cost_model.png; run folders go to
runs/benchmarks/cost_model.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dynbatch_core import RunConfig, run  # noqa: E402
from dynbatch_core.study import analysis  # noqa: E402
from dynbatch_core.study import plots  # noqa: E402
from dynbatch_core.batching.cost_model import AffineCost, min_max_split  # noqa: E402

BATCH = 128
RESOLUTION_PART = "real [1,3]"  # the part whose sweep measures the timing resolution (2 ranks)
STEP_MS, SAMPLE_MS = 10.0, 2.0


def fixed_splits(slowdown: tuple[float, ...]) -> list[tuple[int, ...]]:
    """Candidate fixed splits around the speed-proportional one."""
    if len(slowdown) == 2:
        return [(BATCH - b, b) for b in range(24, 35, 2)]
    splits = {tuple(min_max_split(BATCH, [AffineCost(alpha * k, k) for k in slowdown])) for alpha in (0, 2, 5, 10, 24)}
    return sorted(splits)


def config(args, name: str, world_size: int, steps: int, **options) -> RunConfig:
    return RunConfig(dataset="mnist", data_dir=args.data_dir, model="resnet8", world_size=world_size, initial_batch=BATCH,
                     lr=0.1, lr_decay="none", train_samples=1024, test_samples=200, epochs=steps // 8,
                     out=str(Path(args.runs_dir) / name), overwrite=True, progress=False,
                     checkpoints=False, timeout_s=120.0, **options)


def settle_and_swing(steps: pd.DataFrame, start: int, end: int) -> tuple[float, float, str]:
    """(steps after `start` until every batch stays within 1 sample of the segment's final split, the largest swing
    of one rank's batch after that in samples, the final split)."""
    part = steps[(steps["step"] >= start) & (steps["step"] < end)]
    batches = part.pivot(index="step", columns="rank", values="rank_batch").sort_index()
    batches = batches[batches.sum(axis=1) == BATCH]  # the short last step of an epoch is not a decision
    final = batches.iloc[-5:].median().round()
    off = (batches - final).abs().max(axis=1) > 1
    settled_at = off[off].index.max() + 1 if off.any() else batches.index.min()
    after = batches.loc[settled_at:]
    swing = float((after.max() - after.min()).max()) if not after.empty else float("nan")
    return float(settled_at - start), swing, "/".join(f"{b:g}" for b in final)


def measure(result, part: str, label: str, repeat: int, segments=None) -> list[dict]:
    steps = result.steps
    last = int(steps["step"].max())
    segments = segments or [(0, last + 1)]
    rows = []
    for start, end in segments:
        steady_from = start + (end - start) // 2
        settle, swing, final = settle_and_swing(steps, start, end)
        efficiency = analysis.balance_efficiency(steps[(steps["step"] >= steady_from) & (steps["step"] < end)])
        rows.append({"part": part, "run": label, "repeat": repeat, "segment_start": start,
                     "samples_per_s": analysis.steady_throughput(steps, steady_from, end),
                     "settle_steps": settle, "swing_samples": swing, "final_split": final,
                     "efficiency": float(efficiency["efficiency"].median()), "load_avg": os.getloadavg()[0]})
    return rows


def rotate(runs: list, repeat: int) -> list:
    """The runs in another order each repeat, so no run always follows the same one."""
    return runs[repeat % len(runs):] + runs[:repeat % len(runs)]


def real_jobs(args, part: str, runs: list, repeat: int, phase: str) -> list:
    jobs = []
    for label, options in runs:
        name = f"{part}-{label}-{phase}{repeat}".replace(" ", "_").replace("/", "-").replace("[", "").replace("]", "")
        world_size = len(options["slowdown"])
        jobs.append((part, label, repeat, config(args, name, world_size, steps=args.steps, **options), None))
    return jobs


def run_jobs(jobs: list, description: str, keep_steps=lambda part: False) -> tuple[list[dict], list[pd.DataFrame]]:
    """Run the jobs in order: their measured rows, and the steps tables (with part, run and repeat columns) of the
    runs whose part `keep_steps` accepts."""
    rows, kept = [], []
    for part, label, repeat, run_config, segments in tqdm(jobs, desc=description, unit="run"):
        result = run(run_config)
        rows += measure(result, part, label, repeat, segments)
        if keep_steps(part):
            kept.append(result.steps.assign(part=part, run=label, repeat=repeat))
    return rows, kept


def fastest_fixed(runs: pd.DataFrame) -> str:
    """The label of the fixed split with the best median samples/s over its repeats (the oracle)."""
    fixed = runs[runs["run"].str.startswith("fixed")]
    return fixed.groupby("run")["samples_per_s"].median().idxmax()


def timing_resolution(sweep_steps: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """How finely this machine's timing can place a 2-rank split, from the sweep's fixed-split runs.

    Per run: the per-step difference d = compute_0 - compute_1 over the second half of its full steps, its mean
    and standard deviation. A least-squares line through the runs' mean d against b_1 gives the ms that one sample
    moved from rank 0 to rank 1 takes off d; n = (2 sd / that)^2 is the number of steps at one split whose mean d
    places the balance point within +-1 sample at two standard errors (what a controller needs to settle there),
    sd pooled over the runs."""
    runs = []
    for (part, label, repeat), steps in sweep_steps.groupby(["part", "run", "repeat"], sort=False):
        seconds = steps.pivot(index="step", columns="rank", values="compute_s")
        batches = steps.pivot(index="step", columns="rank", values="rank_batch")
        full = batches.sum(axis=1) == BATCH
        seconds, batches = seconds[full], batches[full]
        half = seconds.index >= seconds.index.min() + (seconds.index.max() - seconds.index.min()) // 2
        difference_ms = (seconds[0] - seconds[1])[half] * 1e3
        runs.append({"part": part, "run": label, "repeat": repeat, "rank1_batch": int(batches[1].median()),
                     "steps": int(half.sum()), "difference_ms": difference_ms.mean(),
                     "difference_sd_ms": difference_ms.std()})
    table = pd.DataFrame(runs)
    slope_ms = -np.polyfit(table["rank1_batch"], table["difference_ms"], 1)[0]
    sd_ms = float(np.sqrt((table["difference_sd_ms"] ** 2).mean()))
    summary = {"ms_per_sample": slope_ms, "pooled_sd_ms": sd_ms,
               "steps_for_one_sample": (2 * sd_ms / slope_ms) ** 2 if slope_ms > 0 else math.inf}
    return table.assign(**summary), summary  # the three summary numbers repeat on every row of the CSV


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the fixed-split sweep")
    parser.add_argument("--race-repeats", type=int, default=5, help="repeats of model, pid and the oracle's split")
    parser.add_argument("--steps", type=int, default=48, help="steps per real-timing run (8 per epoch)")
    parser.add_argument("--only", nargs="+", choices=["real", "four", "trace", "emulated"])
    parser.add_argument("--data-dir", default=os.environ.get("DYNBATCH_DATA"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "benchmarks" / "cost_model"))
    parser.add_argument("--out-dir", default=str(ROOT / "outputs" / "benchmarks"))
    args = parser.parse_args()
    parts = set(args.only or ["real", "four", "trace", "emulated"])
    started = time.perf_counter()

    real_parts = [(part, slowdown) for part, slowdown, key in (("real [1,3]", (1.0, 3.0), "real"),
                                                               ("real [1,1,2,4]", (1.0, 1.0, 2.0, 4.0), "four"))
                  if key in parts]
    sweep = []  # (part, label, repeat, config, segments)
    for repeat in range(args.repeats):
        for part, slowdown in real_parts:
            runs = [(f"fixed {'/'.join(map(str, split))}",
                     dict(balancer="weights", rank_weights=tuple(map(float, split)), slowdown=slowdown))
                    for split in fixed_splits(slowdown)]
            sweep += real_jobs(args, part, rotate(runs, repeat), repeat, "sweep")
    rows, sweep_steps = run_jobs(sweep, "sweep of fixed splits", keep_steps=lambda part: part == RESOLUTION_PART)

    sweep_table = pd.DataFrame(rows)
    oracle_splits = {}  # per part: the fixed split with the best median over the sweep
    for part, _ in real_parts:
        best = fastest_fixed(sweep_table[sweep_table["part"] == part])
        oracle_splits[part] = tuple(float(b) for b in best.removeprefix("fixed ").split("/"))
    jobs = []
    for repeat in range(args.race_repeats):
        for part, slowdown in real_parts:
            split = oracle_splits[part]
            runs = [("model", dict(balancer="model", slowdown=slowdown)),
                    ("pid", dict(balancer="pid", slowdown=slowdown)),
                    ("oracle", dict(balancer="weights", rank_weights=split, slowdown=slowdown))]
            if len(slowdown) == 4:
                runs.append(("equal [1,1,1,1]", dict(balancer="equal", slowdown=(1.0,) * 4)))
            jobs += real_jobs(args, part, rotate(runs, repeat), repeat, "race")
    if "trace" in parts:
        trace = "0:1,1;32:1,3;64:1,1"
        for balancer in ("model", "pid"):
            jobs.append(("trace 1→3→1", balancer, 0, config(args, f"trace-{balancer}", 2, 96, balancer=balancer,
                                                           slowdown_trace=trace), [(0, 32), (32, 64), (64, 96)]))
    if "emulated" in parts:
        for slowdown in ((1.0, 3.0), (1.0, 1.0, 2.0, 4.0)):
            label = "[" + ",".join(f"{k:g}" for k in slowdown) + "]"
            jobs.append((f"emulated {label}", "model", 0, config(
                args, f"emulated-{len(slowdown)}", len(slowdown), 48, balancer="model", slowdown=slowdown,
                emulated_sample_ms=SAMPLE_MS, emulated_step_ms=STEP_MS), None))

    race_rows, traces = run_jobs(jobs, "race, trace, emulated",
                                 keep_steps=lambda part: part.startswith("trace") or part.startswith("emulated"))
    rows += race_rows
    table = pd.DataFrame(rows)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "cost_model_runs.csv", index=False)
    summary = summarise(table)
    summary.to_csv(out / "cost_model_summary.csv", index=False)
    pd.set_option("display.width", 200)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    for part in sorted(p for p in table["part"].unique() if p.startswith("emulated")):
        slowdown = [float(k) for k in part.split("[")[1].rstrip("]").split(",")]
        optimum = min_max_split(BATCH, [AffineCost(STEP_MS * k, SAMPLE_MS * k) for k in slowdown])
        got = table[table["part"] == part].iloc[0]
        print(f"{part}: optimal split {'/'.join(map(str, optimum))}, model ended on {got['final_split']}, settled "
              f"after {got['settle_steps']:.0f} steps, largest swing after that {got['swing_samples']:.0f} samples")
    if sweep_steps:
        resolution, measured = timing_resolution(pd.concat(sweep_steps, ignore_index=True))
        resolution.to_csv(out / "cost_model_resolution.csv", index=False)
        throughput = table[table["run"].str.startswith("fixed") & (table["part"] == RESOLUTION_PART)]
        by_split = throughput.groupby("run")["samples_per_s"]
        medians = by_split.median()
        medians = medians[sorted(medians.index, key=lambda run: -int(run.split("/")[-1]))]  # by rank 1's batch
        ranges = (by_split.max() - by_split.min()) / by_split.median()
        print(f"timing resolution, {RESOLUTION_PART}: one sample moved between the ranks changes their compute-time "
              f"difference by {measured['ms_per_sample']:.1f} ms; that difference varies by "
              f"{measured['pooled_sd_ms']:.1f} ms (sd) from step to step, so placing the balance point within "
              f"+-1 sample takes {measured['steps_for_one_sample']:.0f} steps at one split. Median samples/s of the "
              f"fixed splits: {', '.join(f'{run[6:]} {v:.0f}' for run, v in medians.items())}; the repeats of one "
              f"split range over {100 * ranges.median():.0f} % of its median (median over splits)")
    if traces:
        traces = [steps.assign(run=steps["part"] + ": " + steps["run"]) for steps in traces]
        fig = plots.rank_batches_over_steps(pd.concat(traces, ignore_index=True),
                                            title="Per-rank batch: trace 1→3→1 (real timing) and emulated runs")
        fig.savefig(out / "cost_model.png", dpi=120, bbox_inches="tight")
    print(f"total {time.perf_counter() - started:.0f} s; wrote {out}/cost_model_*")


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per part and run label: median and range over repeats. For the real parts, "of oracle" and "of pid" are the
    paired ratios (this run / the race's oracle run, this run / the race's pid run, same repeat): their median and
    range, and the band's side against 1 (analysis.seed_band). "sweep best" is the oracle split's sweep runs."""
    rows = []
    for part, group in table.groupby("part", sort=False):
        fixed = group[group["run"].str.startswith("fixed")]
        race = group[~group["run"].str.startswith("fixed")]
        labelled = race
        if not fixed.empty:
            best = fastest_fixed(fixed)
            labelled = pd.concat([race, fixed[fixed["run"] == best].assign(run=f"sweep best ({best})")])
        by_repeat = race[race["segment_start"] == 0].pivot_table(index="repeat", columns="run", values="samples_per_s")
        for (label, start), runs in labelled.groupby(["run", "segment_start"], sort=False):
            row = {"part": part, "run": label, "segment_start": start, "repeats": len(runs),
                   "samples_per_s": runs["samples_per_s"].median(),
                   "spread": runs["samples_per_s"].max() - runs["samples_per_s"].min(),
                   "settle_steps": runs["settle_steps"].median(), "settle_max": runs["settle_steps"].max(),
                   "swing_samples": runs["swing_samples"].max(), "efficiency": runs["efficiency"].median(),
                   "final_split": ", ".join(runs["final_split"].unique())}
            for against in ("oracle", "pid"):
                if against in by_repeat and label in by_repeat and label != against:
                    band = analysis.seed_band((by_repeat[label] / by_repeat[against]).dropna())
                    row[f"of_{against}"] = (f"{band['median']:.3f} ({band['low']:.3f}-{band['high']:.3f}, "
                                            f"{band['side']})")
            rows.append(row)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
