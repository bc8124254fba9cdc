"""Heterogeneous ranks: equal vs dbs vs pid vs model splits under emulated slow ranks, one training run per balancer.

The oracle (the best fixed split, swept in the same invocation) and repeated runs: benchmarks/cost_model.py.

    python benchmarks/heterogeneous.py                         # full: 7-13 min on 2 shared CPU cores
    python benchmarks/heterogeneous.py --quick                 # smoke: ~3 min, fewer steps and runs
    python benchmarks/heterogeneous.py --only trace --balancers pid --emulated-sample-ms 3   # noise-free pid check

Scenarios (MNIST, resnet8, global batch 128, SGD lr 0.1 with cosine decay, same seed and data for every balancer
of a scenario; main scenarios 9 epochs x 2048 samples = 144 steps, sweep runs 8 x 1280 = 80 steps):
  2 ranks [1,3]          rank 1 three times slower throughout              ceiling 2.0x
  4 ranks [1,1,2,4]      four ranks share the 2 cores                      ceiling 2.75x
  2 ranks trace 1→3→1    rank 1 slows to 3x at 1/3 of the run, recovers at 2/3
  4 ranks [1,1,1,1]      equal only: what 4 ranks on 2 cores cost (against sweep [1,1], 2 ranks)
  sweep [1,k]            k = 1, 2, 4, 8 on 2 ranks, for the speed-up figure (the [1,3] scenario adds k = 3)
A factor k makes a rank sleep (k - 1) x its own forward+backward time (dynbatch_core/step.py); ceiling speed-up of
the ideal split over the equal one = mean(speed)/min(speed), speed = 1/k (analysis.ceiling_speedup).

Per scenario and balancer (metric definitions in dynbatch_core/analysis.py):
  samples/s        steady state: static scenarios over the second half of the steps, the trace over all its
                   steps (adaptation included); speed-up = that / equal's; of ceil = speed-up / ceiling
  efficiency       median of sum compute_i / (n max compute_i) over the steps after the split settled (or over
                   the second half of the segment when it settled later than that)
  settle           steps after each change until every b_i stays within 5 % of B/n of (a) the split the balancer
                   itself ends on ("settle"), (b) the analytic ideal b_i ∝ 1/k_i ("settle_ideal")
  oscillation      max over ranks of (max b_i - min b_i) / mean b_i, over the same steps as efficiency
  t_acc            training seconds to the first epoch with test accuracy >= --acc-target
  runnable         mean number of ranks computing at once (> 2 on 2 cores: they competed for cores)
Writes outputs/benchmarks/heterogeneous_summary.csv (one row per scenario x balancer), heterogeneous_steps.csv
(per-step rows behind the figures), heterogeneous_{batches,efficiency,speedup}.png. Run folders go to --runs-dir.
pid runs with balance_every 3, kp 0.6, ema 0.6 (see --help). The machine is shared: timings are noisy; every ratio
compares runs of one invocation, and the summary records the 1-minute load average at the start of each run.
"""
from __future__ import annotations

import argparse
import bisect
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dynbatch_core import RunConfig, run  # noqa: E402
from dynbatch_core.study import analysis, plots  # noqa: E402

BALANCERS = ("equal", "dbs", "pid", "model")
TOLERANCE = 0.05        # settled: every |b_i - target_i| <= 5 % of B/n
FINAL_STEPS = 10        # a segment's own final split = median split over its last 10 steps


@dataclass(frozen=True)
class Scenario:
    name: str                                  # label in tables and figures
    world_size: int
    slowdown: tuple[float, ...] | None = None  # static k_i, or
    trace: str | None = None                   # a slowdown trace "step:k_0,k_1;..."
    kind: str = "main"                         # main (long runs, figures), sweep or contention (short runs)
    balancers: tuple[str, ...] = BALANCERS
    gradient_sync: str = "auto"                # --gradient-sync of its runs


def build_scenarios(args) -> list[Scenario]:
    third = args.epochs * (args.train_samples // args.batch_size) // 3
    scenarios = [Scenario("2 ranks [1,3]", 2, (1, 3)), Scenario("4 ranks [1,1,2,4]", 4, (1, 1, 2, 4)),
                 Scenario("2 ranks trace 1→3→1", 2, trace=f"0:1,1;{third}:1,3;{2 * third}:1,1"),
                 Scenario("4 ranks [1,1,1,1]", 4, (1, 1, 1, 1), kind="contention",
                          balancers=("equal",))][:3 if args.quick else 4]
    scenarios += [Scenario(f"sweep [1,{k:g}]", 2, (1, k), kind="sweep") for k in args.sweep]
    scenarios = [s for s in scenarios if not args.only or any(part in s.name for part in args.only)]
    if len(args.gradient_syncs) == 1:
        return [replace(s, gradient_sync=args.gradient_syncs[0]) for s in scenarios]
    # both gradient paths in one invocation, interleaved scenario by scenario: "2 ranks [1,3] · ddp"
    return [replace(s, name=f"{s.name} · {path}", gradient_sync=path) for s in scenarios for path in args.gradient_syncs]


def run_config(args, scenario: Scenario, balancer: str) -> RunConfig:
    main = scenario.kind == "main"
    slug = re.sub(r"[^0-9a-z]+", "-", scenario.name.lower()).strip("-")
    return RunConfig(
        dataset="mnist", data_dir=args.data_dir, model=args.model, world_size=scenario.world_size,
        initial_batch=args.batch_size, lr=args.lr, lr_decay="cosine", seed=args.seed,
        train_samples=args.train_samples if main else args.sweep_train_samples,
        epochs=args.epochs if main else args.sweep_epochs,
        test_samples=args.test_samples if main else args.sweep_test_samples,
        balancer=balancer, slowdown=scenario.slowdown, slowdown_trace=scenario.trace,
        balance_every=args.balance_every, pid_kp=args.pid_kp, pid_ki=args.pid_ki, pid_ema=args.pid_ema,
        dead_band=args.dead_band, max_change=args.max_change, emulated_sample_ms=args.emulated_sample_ms,
        gradient_sync=scenario.gradient_sync,
        out=str(Path(args.runs_dir) / f"{slug}-{balancer}"), overwrite=True, progress=False,
        timeout_s=120.0)  # a step takes < 2 s: a lost rank fails the run in 2 min, not 5


def analyse(scenario: Scenario, balancer: str, result) -> tuple[dict, pd.DataFrame]:
    """One summary row and the run's steps table with an ideal_batch column added (from its slowdown column)."""
    steps = result.steps.copy()
    last, batch, ranks = int(steps["step"].max()), int(steps["global_batch"].iloc[0]), scenario.world_size
    pieces = analysis.slowdown_segments(steps)
    steady_from = (last + 1) // 2 if len(pieces) == 1 else 0  # static: second half; trace: the whole run
    ideal = {start: analysis.ideal_split(batch, factors) for start, _, factors in pieces}
    starts = [start for start, _, _ in pieces]
    steps["ideal_batch"] = [ideal[starts[bisect.bisect_right(starts, step) - 1]][rank]
                            for rank, step in zip(steps["rank"], steps["step"])]
    efficiency = analysis.balance_efficiency(steps).set_index("step")["efficiency"]
    settle, settle_ideal, settled, swings = [], [], [], []
    for start, end, _ in pieces:
        final = steps[steps["step"] >= end - FINAL_STEPS].query("step < @end").groupby("rank")["rank_batch"]
        own = analysis.settle_step(steps, start, final.median().tolist(), TOLERANCE, end)
        to_ideal = analysis.settle_step(steps, start, ideal[start], TOLERANCE, end)
        settle.append(math.nan if own is None else own - start)
        settle_ideal.append(math.nan if to_ideal is None else to_ideal - start)
        # after settling; a split that settles late (or never) is judged over the segment's second half instead
        first = min(own if own is not None else end, start + (end - start) // 2)
        settled.append(efficiency.loc[first:end - 1])
        swings.append(analysis.oscillation(steps, first, end))
    final_split = steps[steps["step"] > last - FINAL_STEPS].groupby("rank")["rank_batch"].median().to_numpy()
    final_ideal = np.asarray(ideal[pieces[-1][0]])
    epochs = result.epochs.assign(first_step=result.epochs["steps"].cumsum() - result.epochs["steps"])
    steady_epochs = epochs[epochs["first_step"] >= steady_from]
    row = {
        "scenario": scenario.name, "kind": scenario.kind, "balancer": balancer, "world_size": ranks,
        "slowdown": ",".join(f"{k:g}" for k in scenario.slowdown) if scenario.slowdown else scenario.trace,
        "slowest": max(max(f) for _, _, f in pieces), "steps": last + 1, "steady_from": steady_from,
        "samples_per_s": analysis.steady_throughput(steps, steady_from),
        "wall_samples_per_s": steady_epochs["samples"].sum() / steady_epochs["epoch_s"].sum(),
        "ceiling": _ceiling(pieces),
        "efficiency_median": float(pd.concat(settled).median()),
        "settle_steps": _worst(settle, pieces) if balancer != "equal" else math.nan,
        "settle_steps_each": "-" if balancer == "equal" else ";".join("-" if math.isnan(s) else f"{s:.0f}"
                                                                      for s in settle),
        "settle_ideal_steps": _worst(settle_ideal, pieces) if balancer != "equal" else math.nan,
        "oscillation": float(np.nanmax(swings)),
        "final_split": "/".join(f"{b:g}" for b in final_split),
        "ideal_split": "/".join(f"{b:.1f}" for b in final_ideal),
        "split_error": float(np.abs(final_split - final_ideal).max() / (batch / ranks)),
        "runnable_ranks": analysis.runnable_ranks(steps[steps["step"] >= steady_from]),
        "final_test_acc": float(result.epochs["test_acc"].iloc[-1]),
        "wall_s": float(result.epochs["wall_s"].iloc[-1]),
    }
    return row, steps


def _worst(settle: list[float], pieces) -> float:
    """Largest settle time over the changes after step 0 (over the only segment of a static run); NaN = never."""
    values = [s for (start, _, _), s in zip(pieces, settle) if start > 0] or settle
    return math.nan if any(math.isnan(v) for v in values) else float(max(values))


def _ceiling(pieces) -> float:
    """Speed-up ceiling over the whole run: equal split's summed step time / ideal split's (per-sample cost model)."""
    equal = sum((end - start) * max(f) for start, end, f in pieces)
    ideal = sum((end - start) * max(f) / analysis.ceiling_speedup(f) for start, end, f in pieces)
    return equal / ideal


def add_ratios(summary: pd.DataFrame, acc_target: float, runs: dict) -> pd.DataFrame:
    summary = summary.copy()
    epochs = analysis.tag_runs({f"{s} {b}": result.epochs for (s, b), result in runs.items()})
    reach = analysis.time_to_reach(epochs, "test_acc", acc_target, lower_is_better=False).set_index("run")
    summary["t_acc_s"] = [reach.loc[f"{s} {b}", "time_s"] for s, b in zip(summary["scenario"], summary["balancer"])]
    summary["acc_target"] = acc_target
    base = summary[summary["balancer"] == "equal"].set_index("scenario")
    summary["speedup"] = summary["samples_per_s"] / summary["scenario"].map(base["samples_per_s"])
    summary["wall_speedup"] = summary["wall_samples_per_s"] / summary["scenario"].map(base["wall_samples_per_s"])
    summary["fraction_of_ceiling"] = summary["speedup"] / summary["ceiling"]
    summary["t_acc_vs_equal"] = summary["t_acc_s"] / summary["scenario"].map(base["t_acc_s"])
    return summary


def plot_figures(summary: pd.DataFrame, steps: pd.DataFrame, out_dir: Path, setting: str) -> list[Path]:
    """Through dynbatch_core.study.plots, the notebooks' figures: per main scenario the per-rank batches (ideal b ∝ 1/k
    dotted) and the balance efficiency of each balancer; the 2-rank speed-up against k."""
    import matplotlib
    matplotlib.use("Agg")
    paths = []
    for scenario in dict.fromkeys(summary.loc[summary["kind"] == "main", "scenario"]):
        part = steps[steps["scenario"] == scenario].rename(columns={"balancer": "run"})
        slug = re.sub(r"[^a-z0-9]+", "-", scenario.lower()).strip("-")
        fig = plots.rank_batches_over_steps(part[part["run"] != "equal"],
                                            title=f"Per-rank batch size, {scenario} ({setting})\n"
                                                  "dotted: the split b ∝ 1/k")
        paths.append(plots.save_figure(fig, f"heterogeneous_batches_{slug}", part, out_dir)["png"])
        fig = plots.balance_efficiency_over_steps(part, title=f"Balance efficiency per step, {scenario} ({setting})",
                                                  window=5)
        paths.append(plots.save_figure(fig, f"heterogeneous_efficiency_{slug}", part, out_dir)["png"])
    two = summary[(summary["world_size"] == 2) & summary["scenario"].str.contains(r"\[1,")]
    fig = plots.speedup_vs_slowdown(two[["slowest", "balancer", "speedup", "ceiling"]],
                                    title=f"Speed-up vs slowdown, 2 ranks ({setting})\nk = 3 from the 144-step "
                                          "[1,3] runs, other k from 80-step sweep runs")
    paths.append(plots.save_figure(fig, "heterogeneous_speedup", two, out_dir)["png"])
    return paths


def print_summary(summary: pd.DataFrame) -> None:
    columns = {"scenario": "scenario", "balancer": "balancer", "samples_per_s": "samples/s", "speedup": "speed-up",
               "wall_speedup": "wall su", "ceiling": "ceiling", "fraction_of_ceiling": "of ceil",
               "efficiency_median": "eff med", "settle_steps_each": "settle", "settle_ideal_steps": "settle*",
               "oscillation": "osc", "final_split": "final split", "ideal_split": "ideal split",
               "t_acc_s": "t_acc s", "runnable_ranks": "runnable", "load_avg": "load"}
    table = summary[list(columns)].rename(columns=columns)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-"))
    print("settle: steps after each change to stay within 5 % of B/n of the split the balancer ends on "
          "('-': never); settle*: same, against b ∝ 1/k (worst change); osc: max (max b - min b)/mean b after "
          "settling; wall su: speed-up from epochs' wall-clock samples/s; load: 1-min load average at the start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (~3 min): fewer steps, sweep k = 4 only, "
                        "no contention run")
    parser.add_argument("--data-dir", default=None, help="folder with mnist.npz (default: the embedded subset)")
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (samples per step)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (cosine decay over each run)")
    parser.add_argument("--train-samples", type=int, default=2048, help="main scenarios: samples per epoch")
    parser.add_argument("--epochs", type=int, default=9, help="main scenarios: epochs (9 x 16 = 144 steps)")
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--sweep", type=float, nargs="+", default=[1, 2, 4, 8], help="slowdowns k of rank 1")
    parser.add_argument("--sweep-train-samples", type=int, default=1280)
    parser.add_argument("--sweep-epochs", type=int, default=8, help="sweep: epochs (8 x 10 = 80 steps)")
    parser.add_argument("--sweep-test-samples", type=int, default=200)
    parser.add_argument("--acc-target", type=float, default=0.85, help="test accuracy for time-to-accuracy")
    # pid: faster than RunConfig's defaults (10, 0.5, 0.3), which settle in 30-40 steps even without timing noise
    parser.add_argument("--balance-every", type=int, default=3, help="pid: steps between split updates")
    parser.add_argument("--pid-kp", type=float, default=0.6)
    parser.add_argument("--pid-ki", type=float, default=0.05)
    parser.add_argument("--pid-ema", type=float, default=0.6)
    parser.add_argument("--dead-band", type=float, default=0.05)
    parser.add_argument("--max-change", type=float, default=0.25)
    parser.add_argument("--emulated-sample-ms", type=float, default=None,
                        help="replace measured compute by exactly b * this * k ms per step (noise-free controller check)")
    parser.add_argument("--gradient-syncs", nargs="+", default=["auto"], choices=["auto", "ddp", "explicit"],
                        help="gradient path(s); two run every scenario on both, in one invocation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", help="run only scenarios whose name contains one of these")
    parser.add_argument("--balancers", nargs="+", default=list(BALANCERS), choices=BALANCERS,
                        help="balancers to run (speed-ups need equal)")
    parser.add_argument("--runs-dir", default=None, help="run folders (default: runs/benchmarks/heterogeneous, "
                        "--quick: runs/benchmarks/heterogeneous-quick/runs)")
    parser.add_argument("--out-dir", default=None, help="default: outputs/benchmarks for the full run, else "
                        "runs/benchmarks/heterogeneous-{quick,partial}: a smoke or partial run never replaces results")
    args = parser.parse_args()
    if args.quick:
        args.train_samples, args.epochs, args.sweep, args.sweep_epochs = 1024, 4, [4], 4
        args.test_samples, args.sweep_train_samples = 500, 640
    partial = args.only or args.emulated_sample_ms is not None or set(args.balancers) != set(BALANCERS) \
        or args.gradient_syncs != ["auto"]
    side_dir = ROOT / "runs" / "benchmarks" / ("heterogeneous-quick" if args.quick else "heterogeneous-partial")
    args.runs_dir = args.runs_dir or str(side_dir / "runs" if args.quick or partial
                                         else ROOT / "runs" / "benchmarks" / "heterogeneous")
    out_dir = Path(args.out_dir or (side_dir if args.quick or partial else ROOT / "outputs" / "benchmarks"))
    started = time.perf_counter()
    scenarios = build_scenarios(args)
    jobs = [(scenario, balancer) for scenario in scenarios for balancer in scenario.balancers
            if balancer in args.balancers]
    rows, tables, results = [], [], {}
    for scenario, balancer in tqdm(jobs, desc="heterogeneous runs", unit="run"):
        config = run_config(args, scenario, balancer)
        load = os.getloadavg()[0]
        results[(scenario.name, balancer)] = result = run(config)
        row, steps = analyse(scenario, balancer, result)
        rows.append({**row, "load_avg": load})
        tables.append(steps.assign(scenario=scenario.name, balancer=balancer))
    summary = add_ratios(pd.DataFrame(rows), args.acc_target, results)
    steps = pd.concat(tables, ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out_dir / "heterogeneous_summary.csv", index=False)
    steps[["scenario", "balancer", "epoch", "step", "rank", "slowdown", "rank_batch", "ideal_batch", "global_batch",
           "compute_s", "wait_s", "loss"]].to_csv(out_dir / "heterogeneous_steps.csv", index=False)
    setting = f"MNIST, {args.model}, B={args.batch_size}, {os.cpu_count()} CPU cores"
    plot_figures(summary, steps, out_dir, setting)
    print_summary(summary)
    print_contention(summary)
    print(f"total {time.perf_counter() - started:.0f} s; wrote {out_dir}/heterogeneous_*")


def print_contention(summary: pd.DataFrame) -> None:
    """What 4 ranks on this machine's cores cost: throughput, ranks competing for cores, per-step jitter."""
    rows = summary.set_index(["scenario", "balancer"])
    four, two, mixed = ("4 ranks [1,1,1,1]", "equal"), ("sweep [1,1]", "equal"), "4 ranks [1,1,2,4]"
    if four not in rows.index or two not in rows.index:
        return
    ratio = rows.loc[four, "samples_per_s"] / rows.loc[two, "samples_per_s"]
    print(f"contention: 4 ranks [1,1,1,1] {rows.loc[four, 'samples_per_s']:.0f} samples/s vs 2 ranks [1,1] "
          f"{rows.loc[two, 'samples_per_s']:.0f} (ratio {ratio:.2f}); runnable ranks {rows.loc[four, 'runnable_ranks']:.2f}"
          f" vs {rows.loc[two, 'runnable_ranks']:.2f} on {os.cpu_count()} cores; median balance efficiency of these "
          f"identical ranks (timing jitter alone) {rows.loc[four, 'efficiency_median']:.3f} vs "
          f"{rows.loc[two, 'efficiency_median']:.3f}")
    for balancer in BALANCERS:
        if (mixed, balancer) in rows.index:
            print(f"  {mixed} {balancer}: runnable ranks {rows.loc[(mixed, balancer), 'runnable_ranks']:.2f} "
                  "(sleeping slow ranks free their cores)")


if __name__ == "__main__":
    main()
