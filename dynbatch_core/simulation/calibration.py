"""A simulated cluster fitted to a real run: each rank's a_i, c_i, noise and spikes from its steps.csv.

    cluster = cluster_from_run("runs/pid-1-3")          # or fit_rank_costs(steps_table)
    cluster.ranks[1]                                    # RankCost(a_s=..., c_s=..., cv=..., spike_prob=..., ...)

Per rank, from its rows after the run's first WARMUP_STEPS steps, compute_s divided by the row's slowdown (the
emulated factor k: the simulation applies the run's own --slowdown again, so a fitted rank is the hardware under
it): the Theil-Sen line (batching/cost_model.fit_affine; a rank that ran one batch size only gets t = c b), then
the ratios measured / predicted. A ratio above 1 + SPIKE_RATIO is a spike (its rate and median size are the
rank's spike_prob and spike_factor); the others' log-ratios give the log-normal CV (robustly: 1.4826 x their
median absolute deviation).

A line is only as good as the spread of batch sizes the run gave that rank. A balanced run's ranks sit within a
few samples of one batch after the first epoch, so a and c trade off against each other (this machine's real
[1,3] pid run fits rank 0 as 32 ms + 0.50 ms/sample, where MEASURED["cpu-here"] has 9 ms + 1.01 ms): right near
the batch it ran, loose far from it. To simulate other batch sizes, calibrate on a run that swept them (an
`increasing` schedule, or --balancer equal at a few --batch-size values).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..batching.cost_model import fit_affine, proportional_fit
from ..records import read_run
from .cluster import Cluster, Network, RankCost

WARMUP_STEPS = 2      # the run's first steps are slow (kernel and allocator warm-up): not the rank's speed
SPIKE_RATIO = 0.5     # a step over 1.5 x its prediction is a spike
MIN_GAP = 2.0         # slopes only from batch sizes at least this far apart (cost_model.fit_affine's min_gap)


def fit_rank_cost(batches: np.ndarray, seconds: np.ndarray, name: str = "") -> RankCost:
    points = list(zip(batches.astype(float).tolist(), seconds.astype(float).tolist()))
    line = fit_affine(points, min_gap=MIN_GAP) or proportional_fit(points)
    if line is None:
        raise ValueError(f"rank {name or '?'}: no step with samples to fit")
    predicted = line.a_s + line.c_s * batches
    ratios = seconds / np.maximum(predicted, 1e-12)
    spikes = ratios > 1 + SPIKE_RATIO
    logs = np.log(ratios[~spikes & (ratios > 0)])
    sigma = 1.4826 * float(np.median(np.abs(logs - np.median(logs)))) if logs.size else 0.0
    return RankCost(a_s=line.a_s, c_s=line.c_s, cv=math.sqrt(math.expm1(sigma * sigma)),
                    spike_prob=float(spikes.mean()), spike_factor=float(np.median(ratios[spikes])) if spikes.any()
                    else 1.0, name=name)


def fit_rank_costs(steps: pd.DataFrame) -> tuple[RankCost, ...]:
    """One RankCost per rank of a steps.csv table (see the module docstring)."""
    first = steps["step"].min()
    steps = steps[(steps["step"] >= first + WARMUP_STEPS) & (steps["rank_batch"] > 0)]
    costs = []
    for rank, rows in steps.groupby("rank", sort=True):
        seconds = rows["compute_s"].to_numpy(float) / rows["slowdown"].fillna(1.0).to_numpy(float)
        costs.append(fit_rank_cost(rows["rank_batch"].to_numpy(float), seconds, name=f"rank {rank}"))
    return tuple(costs)


def cluster_from_run(run_dir: str | Path, network: Network | None = None) -> Cluster:
    """The cluster a real run's ranks describe (a network with nothing to reduce unless given: a step then lasts
    as long as its slowest rank, as the run's own compute_s measures it)."""
    steps = read_run(run_dir).steps
    if steps.empty:
        raise ValueError(f"{run_dir}: no steps.csv rows to calibrate from")
    return Cluster(fit_rank_costs(steps), network=network or Network())
