"""The simulated run: a RunConfig's schedule and balancer driven step by step through RunDecisions (the engine's and
DynamicBatches' decision core), each step's compute drawn from a Cluster instead of measured.

    result = simulate(config, cluster, out="runs/sim-pid-1024", curve=LearningCurve(critical_batch=2048))
    result.steps          # steps.csv: one row per (step, rank) for the ranks in rank_rows
    result.epochs         # epochs.csv, the engine's columns
    read_steps_summary(result.run_dir)   # steps_summary.csv: one row per step over all ranks

What is the engine's, exactly: the epoch's sample count, the lookahead from --loader-workers (a split is planned
lookahead steps before it trains, from what was measured until then), the sampler's short last step
(cut_to_remaining), the schedule's decisions at epoch boundaries and a step rule's inside them, --max-steps, the
balancer's observe/end_epoch, the LR column (scaling, warm-up, decay). What is simulated: compute (cluster.py), the
reduction's exposed time (the only cost beyond the slowest rank: a step lasts max_i compute_i + that), and the loss
(learning.py; test_loss is the same curve, test_acc is empty). A goodput rule reads B_simple = the curve's critical
batch. With --emulated-sample-ms the cluster is the emulation's own (emulated_cluster), and the splits are the
engine's step for step.

steps.csv holds every rank when world_size <= ALL_RANK_ROWS, else a subsample (default_rank_rows: each distinct
rank cost's first rank and RANK_SAMPLE ranks spread evenly); config.json's "simulation" key says which, and
steps_summary.csv has the per-step aggregates (step time, balance efficiency, progress) over all ranks.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..batching.balancers import build_balancer
from ..batching.decisions import RunDecisions, cut_to_remaining, loader_lookahead
from ..batching.lr import decay_factor, scaled_lr, warmup_lr
from ..batching.noise_scale import NoiseEstimate, NoiseScaleSmoother
from ..batching.schedules import EpochSummary, build_schedule
from ..config import RunConfig, balancer_options, schedule_options
from ..engine.emulation import SlowdownPlan
from ..records import (EPOCH_COLUMNS, STEP_COLUMNS, RunResult, prepare_run_dir, read_run, write_json,
                       write_table)
from .cluster import Cluster, Network, RankCost
from .learning import LearningCurve

ALL_RANK_ROWS = 64     # steps.csv holds every rank up to this many ranks
RANK_SAMPLE = 16       # else this many ranks spread evenly, plus each distinct cost's first rank
SUMMARY_FILE = "steps_summary.csv"
SUMMARY_COLUMNS = ["epoch", "step", "global_batch", "step_s", "max_compute_s", "mean_compute_s", "efficiency",
                   "min_rank_batch", "max_rank_batch", "exposed_reduction_s", "progress", "lr"]


def emulated_cluster(config: RunConfig) -> Cluster:
    """The ranks --emulated-sample-ms / --emulated-step-ms describe: (step_ms + b x sample_ms) x k, no noise."""
    if config.emulated_sample_ms is None:
        raise ValueError("emulated_cluster needs --emulated-sample-ms")
    rank = RankCost(a_s=(config.emulated_step_ms or 0.0) / 1000, c_s=config.emulated_sample_ms / 1000,
                    name="emulated")
    return Cluster((rank,) * config.world_size)


def default_rank_rows(cluster: Cluster) -> list[int]:
    """All ranks up to ALL_RANK_ROWS; else each distinct cost's first rank and RANK_SAMPLE ranks spread evenly."""
    n = cluster.world_size
    if n <= ALL_RANK_ROWS:
        return list(range(n))
    firsts = {}
    for rank, cost in enumerate(cluster.ranks):
        firsts.setdefault(dataclasses.replace(cost, name=""), rank)
    spread = {int(round(i * (n - 1) / (RANK_SAMPLE - 1))) for i in range(RANK_SAMPLE)}
    return sorted(spread | set(list(firsts.values())[:RANK_SAMPLE]))


def check_simulation(config: RunConfig, cluster: Cluster) -> int:
    """One-line errors before anything runs; returns the epoch's samples."""
    if cluster.world_size != config.world_size:
        raise ValueError(f"the cluster has {cluster.world_size} ranks, --world-size is {config.world_size}")
    if config.train_samples is None or config.train_samples < 1:
        raise ValueError("a simulated run needs --train-samples (the samples of one epoch)")
    if config.lr_scaling == "adascale" or config.measure_noise:
        raise ValueError("a simulated run has no gradients: --lr-scaling adascale and --measure-noise need real ones")
    if config.epochs < 1 or (config.max_steps is not None and config.max_steps < 1):
        raise ValueError(f"--epochs and --max-steps must be >= 1, got {config.epochs} and {config.max_steps}")
    if config.initial_batch < config.world_size:
        raise ValueError(f"--batch-size {config.initial_batch} leaves some of the {config.world_size} ranks without "
                         "a sample; give at least one per rank")
    SlowdownPlan.from_options(config.world_size, slowdown=config.slowdown, trace=config.slowdown_trace)
    return config.train_samples


class _Simulation:
    def __init__(self, config: RunConfig, cluster: Cluster, curve: LearningCurve, rank_rows: Sequence[int]):
        self.config, self.cluster, self.curve = config, cluster, curve
        self.samples = config.train_samples
        self.rank_rows = list(rank_rows)
        self.rng = np.random.default_rng(config.seed)
        self.smoother = NoiseScaleSmoother()
        self.schedule = build_schedule(config.schedule, **schedule_options(config), noise_smoother=self.smoother,
                                       epoch_samples=self.samples)
        self.balancer = build_balancer(config.balancer_name, config.world_size, **balancer_options(config))
        self.slowdown = SlowdownPlan.from_options(config.world_size, slowdown=config.slowdown,
                                                  trace=config.slowdown_trace)
        self.decisions = RunDecisions(self.schedule, self.balancer, lookahead=loader_lookahead(config.loader_workers))
        self.exposed_s = cluster.exposed_reduction_s()
        self.global_step, self.samples_seen, self.progress, self.training_s = 0, 0, 0.0, 0.0
        self.previous_target_lr = self.target_lr(config.initial_batch, 1.0)
        self.step_rows: list[dict] = []
        self.summary_rows: list[dict] = []
        self.epoch_rows: list[dict] = []

    def target_lr(self, batch: int, lr_factor: float) -> float:
        return scaled_lr(self.config.lr, batch, self.config.lr_batch, self.config.lr_scaling) * lr_factor

    def steps_left(self) -> bool:
        return self.config.max_steps is None or self.global_step < self.config.max_steps

    def run(self, bar: tqdm) -> None:
        for epoch in range(self.config.epochs):
            if not self.steps_left():
                break
            self.run_epoch(epoch, bar)

    def run_epoch(self, epoch: int, bar: tqdm) -> None:
        config, decisions = self.config, self.decisions
        decision, plans = decisions.start_epoch(epoch, next_step=0)
        cursor, step, epoch_s, loss_sum, epoch_steps = 0, 0, 0.0, 0.0, 0
        total_samples = config.epochs * self.samples
        rule = self.schedule.rule
        while cursor < self.samples and self.steps_left():
            rank_batches = cut_to_remaining(plans.pop(step), self.samples - cursor)
            global_batch = sum(rank_batches)
            target = self.target_lr(global_batch, decision.lr_factor)
            lr = warmup_lr(self.previous_target_lr, target, epoch_steps, config.warmup_steps) \
                * decay_factor(config.lr_decay, self.samples_seen, total_samples)
            slowdowns = self.slowdown.factors_at(self.global_step)
            compute = self.cluster.compute_s(rank_batches, slowdowns, self.rng)
            max_compute = float(compute.max())
            step_s = max_compute + self.exposed_s
            if rule is not None:   # the noise estimate a real step would have measured, before the rule observes
                self.smoother.update(NoiseEstimate(gradient_sq=1.0, trace=float(self.curve.critical_batch)))
            plans.update(decisions.step_trained(step, self.global_step, compute.tolist(), rank_batches,
                                                overhead_s=self.exposed_s))
            self.progress += self.curve.progress(global_batch)
            loss = self.curve.loss(self.progress)
            self.record_step(epoch, rank_batches, slowdowns, compute, step_s, loss, lr)
            loss_sum += loss * global_batch
            cursor += global_batch
            epoch_s += step_s
            step += 1
            epoch_steps += 1
            self.global_step += 1
            self.samples_seen += global_batch
            bar.update()
        batch = decisions.batch
        train_loss = loss_sum / max(1, cursor)
        complete = cursor >= self.samples or self.steps_left()
        decisions.end_epoch(EpochSummary(epoch, batch, train_loss, epoch_s) if complete else None)
        self.training_s += epoch_s
        self.epoch_rows.append({
            "epoch": epoch, "global_batch": batch, "steps": epoch_steps, "samples": cursor, "train_loss": train_loss,
            "test_loss": self.curve.loss(self.progress), "test_acc": None, "world_size": config.world_size,
            "epoch_s": epoch_s, "wall_s": self.training_s, "samples_per_s": cursor / epoch_s if epoch_s > 0 else None,
            "noise_scale": None, "noise_gradient_sq": None, "noise_trace": None, "noise_missing": None})
        for row, score in zip(self.epoch_rows, self.schedule.epoch_scores(decisions.history)):
            row["schedule_score"] = score
        self.previous_target_lr = self.target_lr(batch, decision.lr_factor)

    def record_step(self, epoch: int, rank_batches: list[int], slowdowns: Sequence[float], compute: np.ndarray,
                    step_s: float, loss: float, lr: float) -> None:
        global_batch, max_compute = sum(rank_batches), float(compute.max())
        self.summary_rows.append({
            "epoch": epoch, "step": self.global_step, "global_batch": global_batch, "step_s": step_s,
            "max_compute_s": max_compute, "mean_compute_s": float(compute.mean()),
            "efficiency": float(compute.sum() / (len(compute) * max_compute)) if max_compute > 0 else 1.0,
            "min_rank_batch": min(rank_batches), "max_rank_batch": max(rank_batches),
            "exposed_reduction_s": self.exposed_s, "progress": self.progress, "lr": lr})
        for rank in self.rank_rows:
            line = self.balancer.cost_line(rank)
            seconds = float(compute[rank])
            self.step_rows.append({
                "epoch": epoch, "step": self.global_step, "rank": rank, "world_size": self.config.world_size,
                "rank_batch": rank_batches[rank], "global_batch": global_batch, "slowdown": slowdowns[rank],
                "compute_s": seconds, "wait_s": step_s - seconds, "loss": loss, "lr": lr,
                "model_a_s": None if line is None else line.a_s, "model_c_s": None if line is None else line.c_s,
                "rank_grad_sq": None, "global_grad_sq": None})


def simulate(config: RunConfig, cluster: Cluster | None = None, *, out: str | Path | None = None,
             overwrite: bool = False, curve: LearningCurve | None = None, rank_rows: Sequence[int] | None = None,
             progress: bool | None = None) -> RunResult:
    """Simulate `config` on `cluster` (default: the config's emulated ranks) and write a run folder (default: a new
    one under runs/). rank_rows: the ranks steps.csv holds (default_rank_rows). progress: a bar (default: the
    config's --progress)."""
    cluster = emulated_cluster(config) if cluster is None else cluster
    check_simulation(config, cluster)
    curve = curve or LearningCurve()
    rank_rows = default_rank_rows(cluster) if rank_rows is None else sorted(set(rank_rows))
    if any(not 0 <= rank < cluster.world_size for rank in rank_rows):
        raise ValueError(f"rank_rows must lie in [0, {cluster.world_size}), got {rank_rows}")
    simulation = _Simulation(config, cluster, curve, rank_rows)
    run_dir = prepare_run_dir(None if out is None else str(out), overwrite=overwrite,
                              label=f"sim-{config.balancer_name}-{config.world_size}")
    total = config.epochs * math.ceil(config.train_samples / config.initial_batch)
    with tqdm(total=min(total, config.max_steps or total), desc=f"simulating {config.world_size} ranks",
              unit="step", disable=not (config.progress if progress is None else progress), leave=False,
              mininterval=1.0) as bar:
        simulation.run(bar)
    write_json(run_dir / "config.json", {**config.to_dict(), "simulation": {
        "cluster": describe_cluster(cluster), "curve": dataclasses.asdict(curve), "seed": config.seed,
        "rank_rows": "all" if len(rank_rows) == cluster.world_size else rank_rows,
        "steps_summary": SUMMARY_FILE}})
    write_table(run_dir / "steps.csv", simulation.step_rows, STEP_COLUMNS)
    write_table(run_dir / SUMMARY_FILE, simulation.summary_rows, SUMMARY_COLUMNS)
    write_table(run_dir / "epochs.csv", simulation.epoch_rows, EPOCH_COLUMNS)
    return read_run(run_dir)


def describe_cluster(cluster: Cluster) -> dict:
    """The cluster as JSON: each distinct rank cost once, with the ranks that have it (first..last runs)."""
    groups: dict[RankCost, list[int]] = {}
    for rank, cost in enumerate(cluster.ranks):
        groups.setdefault(cost, []).append(rank)
    return {"world_size": cluster.world_size, "network": dataclasses.asdict(cluster.network),
            "rank_costs": [{**dataclasses.asdict(cost), "ranks": _runs(ranks)} for cost, ranks in groups.items()]}


def cluster_from_description(description: dict) -> Cluster:
    """describe_cluster's inverse."""
    ranks: list[RankCost | None] = [None] * description["world_size"]
    for group in description["rank_costs"]:
        values = {k: v for k, v in group.items() if k != "ranks"}
        for first, last in group["ranks"]:
            for rank in range(first, last + 1):
                ranks[rank] = RankCost(**values)
    return Cluster(tuple(ranks), network=Network(**description["network"]))


def _runs(ranks: list[int]) -> list[list[int]]:
    runs = []
    for rank in ranks:
        if runs and runs[-1][1] == rank - 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return runs


def read_steps_summary(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / SUMMARY_FILE)
