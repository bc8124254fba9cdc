"""What a simulated rank's step costs, and what the gradient reduction adds on top.

    rank = RankCost(a_s=0.010, c_s=0.0005, cv=0.05, spike_prob=0.01, spike_factor=3.0, memory_batch=512)
    cluster = Cluster((rank,) * 8, network=Network(gradient_bytes=45e6, bandwidth_Bps=12.5e9, latency_s=5e-6))
    compute_s = cluster.compute_s(rank_batches, slowdowns, rng)     # one float per rank (numpy array)
    step_s = compute_s.max() + cluster.exposed_reduction_s()

A rank's compute for b samples is t(b) = a + c max(b, saturation_batch) (a > 0 fixed cost per step: launches, the
optimizer's share; below saturation_batch a GPU is not yet full and a smaller slice is no faster; an empty slice
costs a), times its slowdown factor k (--slowdown, --slowdown-trace), times log-normal noise of mean 1 and the
given coefficient of variation, times spike_factor with probability spike_prob (a descheduled step). A slice larger
than memory_batch fails the run, as an out-of-memory error would (bound the split with --max-rank-batch).

The reduction: a ring all-reduce of gradient_bytes over n ranks takes 2 (n-1)/n x bytes / bandwidth + 2 (n-1) x
latency (the alpha-beta model); `overlap` of it hides behind the backward pass, the rest adds to every step
(gradient_bytes 0: no reduction is modelled).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


class SimulatedOutOfMemory(RuntimeError):
    """A rank was given more samples than its memory holds."""


@dataclass(frozen=True)
class RankCost:
    a_s: float                      # seconds per step, whatever the batch
    c_s: float                      # seconds per sample
    cv: float = 0.0                 # coefficient of variation of the multiplicative log-normal noise
    spike_prob: float = 0.0         # chance per step that the step takes spike_factor times as long
    spike_factor: float = 1.0
    saturation_batch: int = 0       # below this many samples a step costs as much as at this many
    memory_batch: int | None = None  # the most samples a step may hold (None: no limit)
    name: str = ""                  # the device, for tables and figures

    def __post_init__(self):
        for what, ok in (("a_s >= 0", self.a_s >= 0), ("c_s > 0", self.c_s > 0), ("cv >= 0", self.cv >= 0),
                         ("0 <= spike_prob <= 1", 0 <= self.spike_prob <= 1), ("spike_factor >= 1",
                         self.spike_factor >= 1), ("saturation_batch >= 0", self.saturation_batch >= 0),
                         ("memory_batch >= 1", self.memory_batch is None or self.memory_batch >= 1)):
            if not ok:
                raise ValueError(f"rank cost {self}: needs {what}")

    def time_s(self, batch: float) -> float:
        """The noiseless compute seconds of a `batch`-sample step at full speed."""
        return self.a_s + (self.c_s * max(batch, self.saturation_batch) if batch > 0 else 0.0)


def ring_allreduce_s(world_size: int, gradient_bytes: float, bandwidth_Bps: float, latency_s: float) -> float:
    """Seconds of one ring all-reduce (alpha-beta model); 0 on one rank."""
    if world_size <= 1:
        return 0.0
    return 2 * (world_size - 1) / world_size * gradient_bytes / bandwidth_Bps + 2 * (world_size - 1) * latency_s


@dataclass(frozen=True)
class Network:
    gradient_bytes: float = 0.0     # bytes reduced per step (4 x parameters for float32 gradients)
    bandwidth_Bps: float = 12.5e9   # per-link bytes per second (assumed: 100 Gb/s)
    latency_s: float = 5e-6         # per message (assumed)
    overlap: float = 0.0            # fraction of the reduction hidden behind the backward pass

    def __post_init__(self):
        if self.gradient_bytes < 0 or self.bandwidth_Bps <= 0 or self.latency_s < 0 or not 0 <= self.overlap <= 1:
            raise ValueError(f"network {self}: needs gradient_bytes >= 0, bandwidth_Bps > 0, latency_s >= 0, "
                             "0 <= overlap <= 1")

    def exposed_s(self, world_size: int) -> float:
        """What the reduction adds to a step (nothing when there is nothing to reduce)."""
        if self.gradient_bytes == 0:
            return 0.0
        return (1 - self.overlap) * ring_allreduce_s(world_size, self.gradient_bytes, self.bandwidth_Bps,
                                                     self.latency_s)


@dataclass(frozen=True)
class Cluster:
    ranks: tuple[RankCost, ...]
    network: Network = field(default_factory=Network)

    def __post_init__(self):
        if not self.ranks:
            raise ValueError("a cluster needs at least one rank")
        object.__setattr__(self, "ranks", tuple(self.ranks))
        columns = list(zip(*((r.a_s, r.c_s, r.cv, r.spike_prob, r.spike_factor, r.saturation_batch,
                               math.inf if r.memory_batch is None else r.memory_batch) for r in self.ranks)))
        object.__setattr__(self, "_columns", [np.array(c, dtype=np.float64) for c in columns])

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def exposed_reduction_s(self) -> float:
        return self.network.exposed_s(self.world_size)

    def compute_s(self, rank_batches: Sequence[int], slowdowns: Sequence[float], rng: np.random.Generator
                  ) -> np.ndarray:
        """Every rank's compute seconds for one step (see the module docstring). Draws from `rng` only for ranks
        with noise or spikes, in a fixed order, so a run is a function of its seed."""
        a, c, cv, spike_prob, spike_factor, saturation, memory = self._columns
        batches = np.asarray(rank_batches, dtype=np.float64)
        over = np.flatnonzero(batches > memory)
        if over.size:
            rank = int(over[0])
            raise SimulatedOutOfMemory(f"rank {rank} ({self.ranks[rank].name or 'simulated'}) was given "
                                       f"{int(batches[rank])} samples, its memory holds "
                                       f"{self.ranks[rank].memory_batch}: bound the split with --max-rank-batch")
        # (a + b c) x k, in the order the engine's emulation computes it, so emulated costs match it bit for bit
        work = np.where(batches > 0, np.maximum(batches, saturation), 0.0)
        seconds = (a + work * c) * np.asarray(slowdowns, dtype=np.float64)
        if cv.any():
            sigma = np.sqrt(np.log1p(cv * cv))
            seconds = seconds * np.exp(rng.standard_normal(len(batches)) * sigma - sigma * sigma / 2)
        if spike_prob.any():
            seconds = np.where(rng.random(len(batches)) < spike_prob, seconds * spike_factor, seconds)
        return seconds
