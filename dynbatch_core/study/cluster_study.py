"""The cluster notebook's studies: simulated clusters (simulation/) from a few named scenarios, each study a table
with one row per simulated run (or per compared cell), which cluster_plots draws and cluster_findings describes.

    nb = setup_notebook("cluster", output_dir="runs/notebook-figures", runs_dir="runs/notebooks")
    costs = Costs(step_ms=10, sample_ms=1, per_rank_batch=64, slow_factor=3, cv=0.03, steps_per_epoch=20)
    engine = engine_validation(nb, "outputs/benchmarks/engine_splits.csv")   # .table: engine vs simulated splits
    scaling = scaling_study(nb, costs, world_sizes=[2, 8, 32], scenarios=SCENARIOS, balancers=BALANCERS,
                            model_max_ranks=128, epochs=3)                 # .table: speed-up and ceiling per N
    scenario("half", 8, costs).ceiling(512)                                # 2.0
    noise = noise_study(nb, costs, world_sizes=[8], cvs=[0.02, 0.1], spike_probs=[0, 0.02], spike_factor=3,
                        seeds=20, epochs=8, balancers=BALANCERS, model_max_ranks=128)
    paired_ratio(noise.table, "model", "pid")          # per level: median, 10th-90th percentile, side of 1
    # also communication_study (vs the reduction's share), settle_study (after a slowdown change), planning_study

Scenarios (every rank's cost is (a + c b) x k, a = step_ms, c = sample_ms, b = per_rank_batch at the equal split):
  half         half the ranks k = slow_factor, half k = 1
  straggler    one rank k = slow_factor among N
  generations  profiles.mix of three GPU generations in thirds (as near as N allows), k = 1: c_i = sample_ms x the
               reference card's ResNet-50 throughput / card i's (sourced), a the same on every card (assumed)
Ceiling: the equal split's noiseless step time over the equal-time split's, both with the exposed reduction on top
(split_ceiling). For ranks that differ only in k this is analysis.ceiling_speedup's mean(speed) / min(speed)
(a scales with k as c does); for the mix it comes from the costs. Speed-up and throughput are steady: samples/s
over the second half of a run's steps (analysis.steady_throughput), relative to the equal split at the same seed.
The checks against the engine and against real runs are in cluster_validation.py.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..records import RunResult
from ..simulation import profiles
from ..simulation.cluster import Cluster, Network, RankCost
from ..simulation.simulator import simulate
from .analysis import settle_step, steady_throughput
from .notebook import NotebookSetup

BALANCERS = ("equal", "dbs", "pid", "model")
SCENARIOS = ("half", "straggler", "generations")
SCENARIO_NAMES = {"half": "half the ranks {k:g}× slow", "straggler": "one {k:g}× straggler",
                  "generations": "three GPU generations"}
GENERATIONS = ("H100 80GB SXM5", "A100 80GB SXM4", "V100 16GB")


@dataclasses.dataclass(frozen=True)
class Costs:
    """The simulated ranks of every study but the planning one."""
    step_ms: float = 10.0          # a: fixed ms per step of a 1x rank (launches, optimizer), times its k
    sample_ms: float = 1.0         # c: ms per sample of a 1x rank, times its k
    per_rank_batch: int = 64       # global batch = this x N (the equal split's share)
    slow_factor: float = 3.0       # k of a slow rank
    cv: float = 0.03               # step-to-step noise (log-normal, coefficient of variation)
    steps_per_epoch: int = 20      # dbs re-splits once an epoch

    def rank(self, cv: float | None = None, spike_prob: float = 0.0, spike_factor: float = 1.0) -> RankCost:
        return RankCost(a_s=self.step_ms / 1000, c_s=self.sample_ms / 1000, cv=self.cv if cv is None else cv,
                        spike_prob=spike_prob, spike_factor=spike_factor if spike_prob else 1.0)

    def run_fields(self, world_size: int, epochs: int) -> dict:
        """RunConfig fields of a run of `epochs` epochs at B = per_rank_batch x N."""
        batch = self.per_rank_batch * world_size
        return dict(world_size=world_size, initial_batch=batch, train_samples=batch * self.steps_per_epoch,
                    epochs=epochs)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    ranks: tuple[RankCost, ...]
    slowdown: tuple[float, ...]    # each rank's k (all 1 for the mix, whose ranks differ in cost)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def cluster(self, network: Network | None = None) -> Cluster:
        return Cluster(self.ranks, network=network or Network())

    def ceiling(self, global_batch: float, exposed_s: float = 0.0) -> float:
        return split_ceiling(self.ranks, self.slowdown, global_batch, exposed_s)


def scenario(name: str, world_size: int, costs: Costs, *, cv: float | None = None, spike_prob: float = 0.0,
             spike_factor: float = 1.0) -> Scenario:
    """The named scenario at N ranks (module docstring); cv, spikes: instead of costs.cv and none."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    if world_size < 2:
        raise ValueError(f"a scenario needs at least 2 ranks, got {world_size}")
    rank = costs.rank(cv, spike_prob, spike_factor)
    k = costs.slow_factor
    if name == "half":
        return Scenario(name, (rank,) * world_size, (1.0,) * (world_size // 2) + (k,) * (world_size - world_size // 2))
    if name == "straggler":
        return Scenario(name, (rank,) * world_size, (1.0,) * (world_size - 1) + (k,))
    counts = {card: len(part) for card, part in zip(GENERATIONS, np.array_split(np.arange(world_size), 3))}
    ranks = profiles.mix(counts, reference_sample_s=costs.sample_ms / 1000, step_s=costs.step_ms / 1000,
                         cv=rank.cv, samples_per_gb=None, spike_prob=spike_prob, spike_factor=rank.spike_factor)
    return Scenario(name, ranks, (1.0,) * world_size)


def _cost_columns(ranks: Sequence[RankCost], slowdown: Sequence[float]) -> tuple[np.ndarray, ...]:
    k = np.asarray(slowdown, float)
    return k, np.array([r.a_s for r in ranks]), np.array([r.c_s for r in ranks])


def equal_time_split(ranks: Sequence[RankCost], slowdown: Sequence[float], global_batch: float) -> np.ndarray:
    """The split (floats) at which every rank's noiseless compute k_i (a_i + c_i b_i) takes the same time T:
    b_i = (T / k_i - a_i) / c_i, with T such that the b_i sum to B (a rank that would need b_i < 0 gets 0).
    Saturation is left out: every share is assumed at or above a rank's saturation_batch."""
    k, a, c = _cost_columns(ranks, slowdown)

    def shares(t: float) -> np.ndarray:
        return np.maximum(0.0, (t / k - a) / c)

    low, high = 0.0, float((k * (a + c * global_batch)).max())
    for _ in range(200):   # bisection: the sum of shares rises with T
        middle = (low + high) / 2
        low, high = (middle, high) if shares(middle).sum() < global_batch else (low, middle)
    return shares(high) * global_batch / shares(high).sum()


def split_ceiling(ranks: Sequence[RankCost], slowdown: Sequence[float], global_batch: float,
                  exposed_s: float = 0.0) -> float:
    """Best speed-up of a split over the equal one: (max_i t_i(B/N) + R) / (T + R), T the equal-time split's
    step time (equal_time_split) and R the exposed reduction."""
    k, a, c = _cost_columns(ranks, slowdown)
    equal = equal_step_s(ranks, slowdown, global_batch)
    shares = equal_time_split(ranks, slowdown, global_batch)
    ideal = float((k * (a + c * shares)).max())
    return (equal + exposed_s) / (ideal + exposed_s)


def equal_step_s(ranks: Sequence[RankCost], slowdown: Sequence[float], global_batch: float) -> float:
    """The equal split's noiseless step compute: max_i k_i t_i(B/N)."""
    return float(max(k * r.time_s(global_batch / len(ranks)) for r, k in zip(ranks, slowdown)))


def network_for_ratio(ratio: float, compute_s: float, world_size: int, *, overlap: float = 0.0,
                      bandwidth_Bps: float = Network.bandwidth_Bps, latency_s: float = Network.latency_s) -> Network:
    """The network whose exposed ring all-reduce at `world_size` ranks is `ratio` x `compute_s`: gradient_bytes
    solved from the alpha-beta model (cluster.ring_allreduce_s); ratio 0 is no reduction at all."""
    if ratio <= 0:
        return Network(bandwidth_Bps=bandwidth_Bps, latency_s=latency_s, overlap=overlap)
    wanted = ratio * compute_s / (1 - overlap) - 2 * (world_size - 1) * latency_s
    if wanted <= 0:
        raise ValueError(f"ratio {ratio}: the latency alone exceeds {ratio} x {compute_s} s")
    gradient_bytes = wanted * bandwidth_Bps * world_size / (2 * (world_size - 1))
    return Network(gradient_bytes=gradient_bytes, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s, overlap=overlap)


def extreme_rows(world_size: int) -> list[int]:
    """steps.csv rows of a throughput-only run: its first and last rank (a fast and a slow one in every scenario);
    steps_summary.csv still has every step over all ranks."""
    return sorted({0, world_size - 1})


@dataclasses.dataclass(frozen=True)
class Job:
    """One simulated run of a study: its label (the run folder's name), cluster, RunConfig fields, steps.csv rows."""
    label: str
    cluster: Cluster | None      # None: the config's emulated ranks (simulator.emulated_cluster)
    fields: Mapping
    rank_rows: Sequence[int] | None = None


@dataclasses.dataclass(frozen=True)
class Study:
    table: pd.DataFrame                            # the figure's data (its CSV)
    runs: dict = dataclasses.field(default_factory=dict)   # label -> RunResult of what it simulated
    extra: dict = dataclasses.field(default_factory=dict)  # further tables and numbers (named per study)


def run_jobs(nb: NotebookSetup, jobs: Sequence[Job], *, desc: str, progress: bool = False) -> dict[str, RunResult]:
    """Simulate every job into <runs_dir>/<label> (overwritten); one progress bar over them all."""
    results = {}
    for job in tqdm(jobs, desc=desc, unit="run", disable=not progress, mininterval=1.0):
        config = nb.config(job.label, **job.fields)
        results[job.label] = simulate(config, job.cluster, out=config.out, overwrite=True, rank_rows=job.rank_rows,
                                      progress=False)
    return results


def steady(result: RunResult) -> float:
    """samples/s over the second half of the run's steps."""
    steps = result.steps
    return steady_throughput(steps, after_step=(int(steps["step"].max()) + 1) // 2)


def with_speedup(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """`speedup`: each row's throughput over the equal split's row with the same `keys`."""
    equal = table[table["balancer"] == "equal"].set_index(list(keys))["throughput"]
    base = table.set_index(list(keys)).index.map(equal.to_dict().get)
    return table.assign(speedup=table["throughput"].to_numpy() / np.asarray(base, float))


def affordable(balancers: Sequence[str], world_size: int, model_max_ranks: int | None, *, baseline: bool = True
               ) -> list[str]:
    """The balancers run at N ranks: equal first (the baseline, unless baseline=False), model only up to
    model_max_ranks."""
    chosen = ["equal", *(b for b in balancers if b != "equal")] if baseline else list(balancers)
    return [b for b in chosen if b != "model" or model_max_ranks is None or world_size <= model_max_ranks]


def scaling_study(nb: NotebookSetup, costs: Costs, *, world_sizes: Sequence[int], scenarios: Sequence[str],
                  balancers: Sequence[str], model_max_ranks: int | None, epochs: int, progress: bool = False
                  ) -> Study:
    """Speed-up over equal and its fraction of the ceiling per scenario, N and balancer. Columns: scenario,
    world_size, balancer, throughput, speedup, ceiling, fraction (speedup / ceiling)."""
    jobs, rows = [], []
    for name in scenarios:
        for n in world_sizes:
            setting = scenario(name, n, costs)
            for balancer in affordable(balancers, n, model_max_ranks):
                label = f"scaling {name} n{n} {balancer}"
                jobs.append(Job(label, setting.cluster(), dict(costs.run_fields(n, epochs), balancer=balancer,
                                                               slowdown=setting.slowdown), extreme_rows(n)))
                rows.append({"scenario": name, "world_size": n, "balancer": balancer, "label": label,
                             "ceiling": setting.ceiling(costs.per_rank_batch * n)})
    runs = run_jobs(nb, jobs, desc="scaling", progress=progress)
    table = pd.DataFrame(rows).assign(throughput=lambda t: [steady(runs[label]) for label in t["label"]])
    table = with_speedup(table, ["scenario", "world_size"])
    table["fraction"] = table["speedup"] / table["ceiling"]
    return Study(table[["scenario", "world_size", "balancer", "throughput", "speedup", "ceiling", "fraction"]], runs)


def communication_study(nb: NotebookSetup, costs: Costs, *, world_size: int, ratios: Sequence[float],
                        balancers: Sequence[str], epochs: int, overlap: float = 0.0, progress: bool = False) -> Study:
    """The half scenario at `world_size` with a ring all-reduce whose exposed time is each ratio x the equal split's
    step compute. Columns: ratio, gradient_gb, exposed_s, balancer, throughput, speedup, ceiling."""
    setting = scenario("half", world_size, costs)
    batch = costs.per_rank_batch * world_size
    compute = equal_step_s(setting.ranks, setting.slowdown, batch)
    jobs, rows = [], []
    for ratio in ratios:
        network = network_for_ratio(ratio, compute, world_size, overlap=overlap)
        cluster = setting.cluster(network)
        exposed = cluster.exposed_reduction_s()
        for balancer in affordable(balancers, world_size, None):
            label = f"communication ratio{ratio:g} {balancer}"
            jobs.append(Job(label, cluster, dict(costs.run_fields(world_size, epochs), balancer=balancer,
                                                 slowdown=setting.slowdown), extreme_rows(world_size)))
            rows.append({"ratio": exposed / compute, "gradient_gb": network.gradient_bytes / 1e9, "exposed_s": exposed,
                         "balancer": balancer, "label": label, "ceiling": setting.ceiling(batch, exposed)})
    runs = run_jobs(nb, jobs, desc="communication", progress=progress)
    table = pd.DataFrame(rows).assign(throughput=lambda t: [steady(runs[label]) for label in t["label"]])
    table = with_speedup(table, ["ratio"])
    return Study(table[["ratio", "gradient_gb", "exposed_s", "balancer", "throughput", "speedup", "ceiling"]], runs,
                 {"equal_step_s": compute})


def planning_study(nb: NotebookSetup, *, new: str, new_count: int, old: str, added: Sequence[int],
                   global_batch: int, train_samples: int, epochs: int, balancers: Sequence[str],
                   gradient_bytes: float, overlap: float = 0.0, cv: float = profiles.ASSUMED_CV,
                   progress: bool = False) -> Study:
    """new_count cards of `new` and each count of `old` added (profiles.mix, the V100's seconds per sample from its
    sourced ResNet-50 throughput): the last epoch's seconds per balancer at a fixed global batch and epoch.
    Columns: added, world_size, balancer, epoch_s, ideal_epoch_s (the equal-time split's noiseless steps),
    vs_without (the fastest run without the old cards over this one: > 1, adding them pays)."""
    reference_s = 1.0 / profiles.PROFILES[profiles.REFERENCE].images_per_s
    jobs, rows = [], []
    for count in added:
        ranks = profiles.mix({new: new_count, old: count}, reference_sample_s=reference_s, cv=cv)
        n = len(ranks)
        cluster = Cluster(ranks, network=Network(gradient_bytes=gradient_bytes, overlap=overlap))
        exposed = cluster.exposed_reduction_s()
        shares = equal_time_split(ranks, (1.0,) * n, global_batch)
        ideal_step = max(r.time_s(b) for r, b in zip(ranks, shares)) + exposed
        for balancer in affordable(balancers, n, None):
            label = f"planning {count} added {balancer}"
            jobs.append(Job(label, cluster, dict(world_size=n, initial_batch=global_batch, train_samples=train_samples,
                                                 epochs=epochs, balancer=balancer)))
            rows.append({"added": count, "world_size": n, "balancer": balancer, "label": label,
                         "ideal_epoch_s": ideal_step * train_samples / global_batch})
    runs = run_jobs(nb, jobs, desc="planning", progress=progress)
    table = pd.DataFrame(rows).assign(epoch_s=lambda t: [float(runs[label].epochs["epoch_s"].iloc[-1])
                                                         for label in t["label"]])
    without = table.loc[table["added"] == min(added), "epoch_s"].min()
    table["vs_without"] = without / table["epoch_s"]
    table["new_card"], table["new_count"], table["old_card"] = new, new_count, old
    return Study(table[["added", "world_size", "balancer", "epoch_s", "ideal_epoch_s", "vs_without", "new_card",
                        "new_count", "old_card"]], runs, {"global_batch": global_batch, "train_samples": train_samples,
                                                          "gradient_bytes": gradient_bytes})


def noise_study(nb: NotebookSetup, costs: Costs, *, world_sizes: Sequence[int], cvs: Sequence[float],
                spike_probs: Sequence[float], spike_factor: float, seeds: int, epochs: int,
                balancers: Sequence[str], model_max_ranks: int | None, progress: bool = False) -> Study:
    """The half scenario per N, noise level (cv, spike rate) and seed, every balancer at the same seed (the same
    noise draws). Columns: world_size, cv, spike_prob, seed, balancer, throughput, speedup (over equal's at the
    seed)."""
    jobs, rows = [], []
    for n in world_sizes:
        for cv in cvs:
            for spike_prob in spike_probs:
                setting = scenario("half", n, costs, cv=cv, spike_prob=spike_prob, spike_factor=spike_factor)
                for seed in range(seeds):
                    for balancer in affordable(balancers, n, model_max_ranks):
                        label = f"noise n{n} cv{cv:g} spikes{spike_prob:g} seed{seed} {balancer}"
                        jobs.append(Job(label, setting.cluster(), dict(costs.run_fields(n, epochs), balancer=balancer,
                                                                       slowdown=setting.slowdown, seed=seed),
                                        extreme_rows(n)))
                        rows.append({"world_size": n, "cv": cv, "spike_prob": spike_prob, "seed": seed,
                                     "balancer": balancer, "label": label})
    runs = run_jobs(nb, jobs, desc="noise", progress=progress)
    table = pd.DataFrame(rows).assign(throughput=lambda t: [steady(runs[label]) for label in t["label"]])
    table = with_speedup(table, ["world_size", "cv", "spike_prob", "seed"])
    return Study(table.drop(columns="label"), runs, {"spike_factor": spike_factor})


def noise_bands(table: pd.DataFrame, low: float = 0.1, high: float = 0.9) -> pd.DataFrame:
    """Per N, noise level and balancer: the seeds' median speed-up over equal and its [low, high] quantiles."""
    grouped = table.groupby(["world_size", "cv", "spike_prob", "balancer"], sort=False)["speedup"]
    return grouped.agg(median="median", low=lambda s: s.quantile(low), high=lambda s: s.quantile(high),
                       seeds="count").reset_index()


def paired_ratio(table: pd.DataFrame, balancer: str, against: str, low: float = 0.1, high: float = 0.9
                 ) -> pd.DataFrame:
    """Per N and noise level: `balancer`'s throughput over `against`'s at the same seed, its median, [low, high]
    quantiles over the seeds, and side: "above" (the whole band over 1), "below", or "within" (the band holds 1)."""
    keys = ["world_size", "cv", "spike_prob"]
    wide = table.pivot_table(index=[*keys, "seed"], columns="balancer", values="throughput")
    if balancer not in wide or against not in wide:
        return pd.DataFrame(columns=[*keys, "median", "low", "high", "seeds", "side"])
    ratio = (wide[balancer] / wide[against]).dropna().rename("ratio").reset_index()
    bands = ratio.groupby(keys, sort=False)["ratio"].agg(
        median="median", low=lambda s: s.quantile(low), high=lambda s: s.quantile(high), seeds="count").reset_index()
    bands["side"] = np.where(bands["low"] > 1, "above", np.where(bands["high"] < 1, "below", "within"))
    return bands


def slowdown_trace_file(path, change_step: int, before: Sequence[float], after: Sequence[float]) -> str:
    """A --slowdown-trace CSV (step,k_0,...): `before` from step 0, `after` from change_step. A file, not the
    inline form, so that config.json names the trace instead of holding thousands of factors."""
    rows = [(0, before), (change_step, after)]
    text = "\n".join(",".join([str(step), *(f"{k:g}" for k in factors)]) for step, factors in rows) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def settle_study(nb: NotebookSetup, costs: Costs, *, world_sizes: Sequence[int], balancers: Sequence[str],
                 change_step: int, epochs: int, cv: float, model_max_ranks: int | None, tolerance: float = 0.05,
                 progress: bool = False) -> Study:
    """Half the ranks go from k = 1 to slow_factor at change_step: the steps until every rank's batch stays within
    tolerance x B/N of the equal-time split of the new costs (analysis.settle_step). equal is left out (it never
    moves). Columns: world_size, balancer, settle_steps (NaN: not settled by the run's end), steps_after (the steps
    the run had after the change)."""
    jobs, rows = [], []
    for n in world_sizes:
        after = scenario("half", n, costs).slowdown
        trace = slowdown_trace_file(nb.runs_dir / f"settle-trace-n{n}.csv", change_step, (1.0,) * n, after)
        ranks = (costs.rank(cv),) * n
        ideal = equal_time_split(ranks, after, costs.per_rank_batch * n)
        for balancer in affordable([b for b in balancers if b != "equal"], n, model_max_ranks, baseline=False):
            label = f"settle n{n} {balancer}"
            jobs.append(Job(label, Cluster(ranks), dict(costs.run_fields(n, epochs), balancer=balancer,
                                                        slowdown_trace=trace), list(range(n))))
            rows.append({"world_size": n, "balancer": balancer, "label": label, "ideal": ideal})
    runs = run_jobs(nb, jobs, desc="settle", progress=progress)
    for row in rows:
        steps = runs[row["label"]].steps
        settled = settle_step(steps, change_step, row.pop("ideal"), tolerance)
        row["settle_steps"] = np.nan if settled is None else settled - change_step
        row["steps_after"] = int(steps["step"].max()) + 1 - change_step
    table = pd.DataFrame(rows)
    return Study(table[["world_size", "balancer", "settle_steps", "steps_after"]], runs,
                 {"change_step": change_step, "tolerance": tolerance})
