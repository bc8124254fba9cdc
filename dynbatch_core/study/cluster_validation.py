"""The cluster notebook's two checks of the simulator: against the engine's own splits on emulated costs, and
against real runs on this machine, calibrated on one of them.

    engine = engine_validation(nb, "outputs/benchmarks/engine_splits.csv")   # .table: engine vs simulated per cell
    engine_agreement(engine.table)                        # per scenario and balancer: cells, differing, ...
    steps, source = validation_steps(nb, "outputs/benchmarks/simulator_validation_steps.csv")
    real = real_validation(nb, steps, seeds=[0, 1, 2])    # .table: throughput and settle steps, real and simulated
    both = real_validations(nb, steps, seeds=[0, 1, 2])   # the same calibrated on each balancer's repeat 0 in turn

The engine table (benchmarks/record_engine_splits.py) holds each run's per-(step, rank) batches and emulated
compute; the run's config is read back from it: ranks and k from the first step, B, the epoch's samples (the sum
of its steps' global batches), epochs, and the emulated ms per step and per sample (a line through compute_s / k
against rank_batch, exact for emulated costs, rounded to 1e-6 ms).

The real table (VALIDATION_COLUMNS, the engine's steps.csv columns plus balancer and repeat) holds repeats of real
runs. Repeat 0 of `calibrate_on` is the calibration: calibration.fit_rank_costs on its steps (per rank, the
slowdown divided out), and its mean per-step overhead beyond the slowest rank's compute (the all-reduce, the
optimizer, the loader) as a fixed exposed reduction: the mean, because steady throughput is a ratio of sums, and a
median leaves out the long tail of stalls that real steps have (about 1.5 ms a step here). The calibrated cluster
is simulated at the runs' own slowdown, B, epochs and samples, once per seed and balancer; the other repeats are
what it is compared with (real_validations: calibrated on each balancer's repeat 0 in turn). Without the
recorded file a stand-in table is simulated from profiles.MEASURED["cpu-here"] (itself calibrated on this
machine's real [1,3] runs), and every sentence about it says so.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..simulation import calibration, profiles
from ..simulation.cluster import Cluster
from .analysis import settle_step, step_times, steady_throughput
from .cluster_study import Job, Study, equal_time_split, network_for_ratio, run_jobs
from .notebook import NotebookSetup

VALIDATION_COLUMNS = ("balancer", "repeat", "epoch", "step", "rank", "rank_batch", "global_batch", "slowdown",
                      "compute_s", "wait_s")
SETTLE_HOLD = 8   # steps in a row inside the band: a real run's later excursion (a burst of load) is not settling
STAND_IN = dict(global_batch=128, train_samples=4096, epochs=2, slowdown=(1.0, 3.0), overhead_s=0.003, repeats=4)


def _slug(scenario: str) -> str:
    return scenario.strip("[]").replace(",", "-")


def run_fields(steps: pd.DataFrame) -> dict:
    """RunConfig fields of the run a steps table holds: world_size, slowdown (at its first step), initial_batch,
    train_samples (its first epoch's samples) and epochs."""
    first = steps[steps["step"] == steps["step"].min()].sort_values("rank")
    per_step = steps.groupby("step", sort=True)[["epoch", "global_batch"]].first()
    samples = per_step.loc[per_step["epoch"] == per_step["epoch"].min(), "global_batch"].sum()
    return dict(world_size=len(first), slowdown=tuple(float(k) for k in first["slowdown"]),
                initial_batch=int(first["global_batch"].iloc[0]), train_samples=int(samples),
                epochs=int(steps["epoch"].nunique()))


def emulated_fields(steps: pd.DataFrame) -> dict:
    """The emulated cost the steps were measured on: compute_s / k = step_ms + b x sample_ms, fitted."""
    used = steps[steps["rank_batch"] > 0]
    sample_s, step_s = np.polyfit(used["rank_batch"].to_numpy(float),
                                  (used["compute_s"] / used["slowdown"]).to_numpy(float), 1)
    return dict(emulated_sample_ms=round(sample_s * 1000, 6), emulated_step_ms=round(step_s * 1000, 6),
                skip_emulated_sleep=True)


def engine_validation(nb: NotebookSetup, path: str, *, progress: bool = False) -> Study:
    """Each engine run of the table at `path` (relative to the repo root) simulated on its emulated costs.
    Columns: scenario, balancer, epoch, step, rank, slowdown, engine_batch, simulated_batch, engine_compute_s,
    simulated_compute_s, differs (the batches differ, or one side lacks the cell)."""
    engine = pd.read_csv(nb.repo / path)
    parts = dict(list(engine.groupby(["scenario", "balancer"], sort=False)))
    jobs = [Job(f"engine {_slug(scenario)} {balancer}", None,
                dict(run_fields(part), **emulated_fields(part), balancer=balancer))
            for (scenario, balancer), part in parts.items()]
    runs = run_jobs(nb, jobs, desc="engine", progress=progress)
    tables = []
    for ((scenario, balancer), part), job in zip(parts.items(), jobs):
        simulated = runs[job.label].steps[["step", "rank", "rank_batch", "compute_s"]]
        both = part[["epoch", "step", "rank", "slowdown", "rank_batch", "compute_s"]].merge(
            simulated, on=["step", "rank"], how="outer", suffixes=("_engine", "_simulated"))
        tables.append(both.assign(scenario=scenario, balancer=balancer))
    table = pd.concat(tables, ignore_index=True).rename(columns={
        "rank_batch_engine": "engine_batch", "rank_batch_simulated": "simulated_batch",
        "compute_s_engine": "engine_compute_s", "compute_s_simulated": "simulated_compute_s"})
    table["differs"] = ~(table["engine_batch"] == table["simulated_batch"])
    return Study(table[["scenario", "balancer", "epoch", "step", "rank", "slowdown", "engine_batch", "simulated_batch",
                        "engine_compute_s", "simulated_compute_s", "differs"]], runs)


def engine_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Per scenario and balancer: cells compared, differing cells, the largest compute difference (s)."""
    table = table.assign(compute_diff_s=(table["engine_compute_s"] - table["simulated_compute_s"]).abs())
    return table.groupby(["scenario", "balancer"], sort=False).agg(
        cells=("differs", "size"), differing=("differs", "sum"), max_compute_diff_s=("compute_diff_s", "max")
    ).reset_index()


def overhead_s(steps: pd.DataFrame) -> float:
    """The mean per-step time beyond the slowest rank's compute (step time: analysis.step_times)."""
    slowest = steps.groupby("step")["compute_s"].max().sort_index()
    return max(0.0, float((step_times(steps) - slowest).mean()))


def overhead_cluster(ranks, seconds: float) -> Cluster:
    """The ranks with `seconds` of exposed reduction a step (a network solved for it, no latency)."""
    network = network_for_ratio(1.0 if seconds > 0 else 0.0, seconds, len(ranks), latency_s=0.0)
    return Cluster(tuple(ranks), network=network)


def stand_in_steps(nb: NotebookSetup, *, progress: bool = False) -> pd.DataFrame:
    """What the recorded table would hold, simulated: pid and model, STAND_IN["repeats"] repeats each, on two
    profiles.MEASURED["cpu-here"] ranks at slowdown (1, 3), B = 128, with 3 ms of overhead a step."""
    options = STAND_IN
    cluster = overhead_cluster((profiles.MEASURED["cpu-here"],) * 2, options["overhead_s"])
    fields = dict(world_size=2, slowdown=options["slowdown"], initial_batch=options["global_batch"],
                  train_samples=options["train_samples"], epochs=options["epochs"])
    jobs = [Job(f"stand-in {balancer} repeat{repeat}", cluster, dict(fields, balancer=balancer, seed=1000 + repeat))
            for balancer in ("pid", "model") for repeat in range(options["repeats"])]
    runs = run_jobs(nb, jobs, desc="stand-in", progress=progress)
    return pd.concat([runs[job.label].steps.assign(balancer=job.fields["balancer"], repeat=job.fields["seed"] - 1000)
                      for job in jobs], ignore_index=True)


def validation_steps(nb: NotebookSetup, path: str, *, progress: bool = False) -> tuple[pd.DataFrame, str]:
    """(table, source): the recorded real repeats at `path` (relative to the repo root) and "recorded <path>", or,
    without that file, stand_in_steps and "stand-in"."""
    file = nb.repo / path
    if not file.is_file():
        return stand_in_steps(nb, progress=progress), "stand-in"
    table = pd.read_csv(file)
    missing = [column for column in VALIDATION_COLUMNS if column not in table]
    if missing:
        raise ValueError(f"{path}: needs columns {', '.join(VALIDATION_COLUMNS)}; missing {', '.join(missing)}")
    return table, f"recorded {path}"


def _run_metrics(steps: pd.DataFrame, ideal, tolerance: float) -> dict:
    first = int(steps["step"].min())
    half = first + (int(steps["step"].max()) + 1 - first) // 2
    settled = settle_step(steps, first, ideal, tolerance, hold=SETTLE_HOLD)
    return {"throughput": steady_throughput(steps, after_step=half),
            "settle_steps": np.nan if settled is None else settled - first}


def real_validation(nb: NotebookSetup, steps: pd.DataFrame, *, seeds, calibrate_on: str = "pid",
                    tolerance: float = 0.05, progress: bool = False) -> Study:
    """Calibrate on repeat 0 of `calibrate_on`, simulate each balancer of the table per seed (module docstring).
    Columns: balancer, source ("real", "simulated"), index (repeat or seed), calibration (the repeat calibrated on),
    throughput (samples/s over the second half of the steps), settle_steps (the first of SETTLE_HOLD steps in a row
    within tolerance x B/N of the calibrated costs' equal-time split; NaN: never that long)."""
    first_repeat = steps["repeat"].min()
    calibration_steps = steps[(steps["balancer"] == calibrate_on) & (steps["repeat"] == first_repeat)]
    if calibration_steps.empty:
        raise ValueError(f"no {calibrate_on} run of repeat {first_repeat} to calibrate on")
    ranks = calibration.fit_rank_costs(calibration_steps)
    fields = run_fields(calibration_steps)
    cluster = overhead_cluster(ranks, overhead_s(calibration_steps))
    ideal = equal_time_split(ranks, fields["slowdown"], fields["initial_batch"])
    balancers = list(dict.fromkeys(steps["balancer"]))
    jobs = [Job(f"validation cal-{calibrate_on} {balancer} seed{seed}", cluster,
                dict(fields, balancer=balancer, seed=seed)) for balancer in balancers for seed in seeds]
    runs = run_jobs(nb, jobs, desc="validation", progress=progress)
    rows = [{"balancer": balancer, "source": "real", "index": int(repeat),
             "calibration": bool(balancer == calibrate_on and repeat == first_repeat),
             **_run_metrics(part, ideal, tolerance)}
            for (balancer, repeat), part in steps.groupby(["balancer", "repeat"], sort=False)]
    rows += [{"balancer": job.fields["balancer"], "source": "simulated", "index": job.fields["seed"],
              "calibration": False, **_run_metrics(runs[job.label].steps, ideal, tolerance)} for job in jobs]
    costs = pd.DataFrame([{"rank": rank, "a_ms": 1000 * cost.a_s, "c_ms": 1000 * cost.c_s, "cv": cost.cv,
                           "spike_prob": cost.spike_prob, "spike_factor": cost.spike_factor}
                          for rank, cost in enumerate(ranks)])
    return Study(pd.DataFrame(rows), runs, {"costs": costs, "overhead_s": cluster.exposed_reduction_s(),
                                            "ideal_split": [float(b) for b in ideal], "calibrate_on": calibrate_on,
                                            "fields": fields, "settle_hold": SETTLE_HOLD, "tolerance": tolerance})


def real_validations(nb: NotebookSetup, steps: pd.DataFrame, *, seeds, tolerance: float = 0.05,
                     progress: bool = False) -> Study:
    """real_validation calibrated on each balancer's repeat 0 in turn: a calibration on a run of one balancer is
    checked on the other's repeats too. table: real_validation's columns plus calibrate_on; extra["by_calibration"]:
    calibrate_on -> that validation's extra."""
    studies = {balancer: real_validation(nb, steps, seeds=seeds, calibrate_on=balancer, tolerance=tolerance,
                                         progress=progress)
               for balancer in dict.fromkeys(steps["balancer"])}
    table = pd.concat([study.table.assign(calibrate_on=balancer) for balancer, study in studies.items()],
                      ignore_index=True)
    runs = {label: result for study in studies.values() for label, result in study.runs.items()}
    return Study(table, runs, {"by_calibration": {balancer: study.extra for balancer, study in studies.items()}})


def calibrated_costs(study: Study) -> pd.DataFrame:
    """real_validations' fitted per-rank costs, indexed by (calibrated on, row)."""
    return pd.concat({on: extra["costs"] for on, extra in study.extra["by_calibration"].items()},
                     names=["calibrated on", None])
