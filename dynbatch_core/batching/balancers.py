"""Balancers: split a global batch B into per-rank sizes b_0..b_{n-1} with sum b_i = B.

    balancer = build_balancer("pid", world_size=2, balance_every=10)
    balancer.split(64)                                   # -> [32, 32] before any measurement
    balancer.observe(compute_s=[0.12, 0.36], rank_batches=[32, 32])   # after every step, same values on every rank
    balancer.end_epoch()                                 # after the last step of every epoch

Every rank holds its own balancer and feeds it the same all-gathered measurements (each rank's compute time and
batch size of the last step, never its wait time). The training loop uses rank 0's split, broadcast to all ranks
(agreement.decided_by_rank0): equal inputs give equal float results only on identical math libraries. Sizes are
integers >= min_rank_batch (and <= max_rank_batch when given, the memory guard) rounded by largest remainder from
float shares, so any B can be split at any time:

    equal      shares 1/n
    weights    shares fixed by the user (--rank-weights 3,13)
    dbs        shares = each rank's samples/s over the previous epoch (Ye et al. 2020); equal in the first epoch
    pid        every balance_every steps, shares move towards the measured throughput shares with a PI
               controller, a dead band on the ranks' step-time spread and a cap on each move (Tyagi & Sharma 2020)
    model      per-rank affine step-time fits t_i(b) = a_i + c_i b and the exact integer split minimising the
               slowest rank's predicted time, held until a new split beats it by more than the fits' noise

state_dict() is plain Python (floats, ints, lists) and holds everything a balancer learned, including a
half-filled measurement window: a restored balancer makes exactly the decisions the original would.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .balancer_base import Balancer
from .model_balancer import ModelBalancer
from .registry import registered, taken_options


class EqualBalancer(Balancer):
    """b_i = B / n, the remainder to the lowest ranks."""

    name = "equal"


class WeightsBalancer(Balancer):
    """Fixed shares given by the user (e.g. --rank-weights 3,13), as a DBS-style static split."""

    name = "weights"
    options = ("rank_weights",)

    def __init__(self, world_size: int, *, rank_weights: Sequence[float] | None = None, **bounds):
        super().__init__(world_size, **bounds)
        rank_weights = [1.0] * world_size if rank_weights is None else rank_weights
        if len(rank_weights) != world_size:
            raise ValueError(f"rank_weights needs {world_size} entries, got {len(rank_weights)}")
        self.rank_weights = [float(w) for w in rank_weights]

    def weights(self) -> list[float]:
        return list(self.rank_weights)


class _Window:
    """Per-rank sums of samples and compute seconds over some steps (numpy arrays; plain lists in state_dict)."""

    def __init__(self, world_size: int):
        self.samples = np.zeros(world_size)
        self.compute_s = np.zeros(world_size)
        self.steps = 0

    def add(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        if len(compute_s) != len(self.samples) or len(rank_batches) != len(self.samples):
            raise ValueError(f"one compute_s and one batch per rank ({len(self.samples)}), got {len(compute_s)} and "
                             f"{len(rank_batches)}")
        self.samples = self.samples + np.array(rank_batches, dtype=np.float64)
        self.compute_s = self.compute_s + np.array(compute_s, dtype=np.float64)
        self.steps += 1

    def throughput(self) -> np.ndarray | None:
        """Samples per second of each rank, or None while some rank has no measurement."""
        if ((self.samples <= 0) | (self.compute_s <= 0)).any():
            return None
        return self.samples / self.compute_s

    def state_dict(self) -> dict:
        return {"samples": self.samples.tolist(), "compute_s": self.compute_s.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.samples = np.array(state["samples"], dtype=np.float64)
        self.compute_s = np.array(state["compute_s"], dtype=np.float64)
        self.steps = state["steps"]


def _normalised(values: Sequence[float] | np.ndarray) -> list[float]:
    """values / their sum, the sum taken by Python's sum() over the values in order, as before."""
    values = values.tolist() if isinstance(values, np.ndarray) else list(values)
    total = float(sum(values))
    return (np.array(values, dtype=np.float64) / total).tolist()


class DBSBalancer(Balancer):
    """Ye et al., "DBS: Dynamic Batch Size for Distributed DNN Training" (2020): at the end of every epoch

        share_i = x_i / sum_j x_j,   x_i = sum of rank i's samples / sum of its compute seconds over that epoch,

    used for the whole next epoch. The first epoch is split equally; an epoch in which some rank measured nothing
    (no samples or no time) leaves the shares as they were.
    """

    name = "dbs"

    def __init__(self, world_size: int, **bounds):
        super().__init__(world_size, **bounds)
        self.shares = [1.0 / world_size] * world_size
        self.epoch_window = _Window(world_size)

    def weights(self) -> list[float]:
        return list(self.shares)

    def observe(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        self.epoch_window.add(compute_s, rank_batches)

    def end_epoch(self) -> None:
        throughput = self.epoch_window.throughput()
        if throughput is not None:
            self.shares = _normalised(throughput)
        self.epoch_window = _Window(self.world_size)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "shares": list(self.shares), "epoch_window": self.epoch_window.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.shares = list(state["shares"])
        self.epoch_window.load_state_dict(state["epoch_window"])


class PIDBalancer(Balancer):
    """Tyagi & Sharma, "Taming Resource Heterogeneity In Distributed ML Training With Dynamic Batching" (2020).

    Every balance_every steps (observe() calls), from the window of steps since the last update:
      1. throughput   r_i = sum samples_i / sum compute_s_i;  x_i <- pid_ema * r_i + (1 - pid_ema) * x_i
                      (x_i = r_i at the first update); target share s*_i = x_i / sum_j x_j.
      2. dead band    T_i = rank i's mean step compute time in the window; if (max T - min T) / max T <= dead_band
                      the split is balanced to within the noise: no change, and the integral is reset (anti-windup).
      3. PI step      e_i = s*_i - s_i;  I_i <- I_i + e_i;  delta_i = pid_kp * e_i + pid_ki * I_i.
      4. cap          the whole delta is scaled down so that no |delta_i| exceeds max_change / n (and I keeps
                      its old value: a capped move does not integrate, anti-windup); then
                      s_i <- max(s_i + delta_i, 0.001 / n), normalised to sum 1.
    A share-proportional-to-throughput split is steady exactly when all ranks' step times are equal, which is also
    what the dead band measures. split(B) = largest_remainder_split(B, s) for any B. A window in which some rank
    measured nothing is dropped.
    """

    name = "pid"
    options = ("balance_every", "pid_kp", "pid_ki", "pid_ema", "dead_band", "max_change")

    def __init__(self, world_size: int, *, balance_every: int = 3, pid_kp: float = 0.6, pid_ki: float = 0.05,
                 pid_ema: float = 0.6, dead_band: float = 0.05, max_change: float = 0.25, **bounds):
        super().__init__(world_size, **bounds)
        for what, value, ok in (("balance_every", balance_every, balance_every >= 1),
                                ("pid_kp", pid_kp, pid_kp >= 0), ("pid_ki", pid_ki, pid_ki >= 0),
                                ("pid_ema", pid_ema, 0 < pid_ema <= 1), ("dead_band", dead_band, dead_band >= 0),
                                ("max_change", max_change, max_change > 0)):
            if not ok:
                raise ValueError(f"pid balancer: {what}={value} is out of range (balance_every >= 1, gains >= 0, "
                                 "0 < pid_ema <= 1, dead_band >= 0, max_change > 0)")
        self.balance_every, self.pid_kp, self.pid_ki = balance_every, pid_kp, pid_ki
        self.pid_ema, self.dead_band, self.max_change = pid_ema, dead_band, max_change
        self.shares = [1.0 / world_size] * world_size
        self.throughput: list[float] = []  # smoothed samples/s per rank; empty before the first update
        self.integral = [0.0] * world_size
        self.window = _Window(world_size)

    def weights(self) -> list[float]:
        return list(self.shares)

    def observe(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        self.window.add(compute_s, rank_batches)
        if self.window.steps >= self.balance_every:
            window, self.window = self.window, _Window(self.world_size)
            self._update(window)

    def _update(self, window: _Window) -> None:
        sample = window.throughput()
        if sample is None:
            return
        if self.throughput:
            sample = self.pid_ema * sample + (1 - self.pid_ema) * np.array(self.throughput, dtype=np.float64)
        self.throughput = sample.tolist()
        step_s = window.compute_s / window.steps
        slowest = float(step_s.max())
        if (slowest - float(step_s.min())) / slowest <= self.dead_band:
            self.integral = [0.0] * self.world_size
            return
        shares = np.array(self.shares, dtype=np.float64)
        errors = np.array(_normalised(self.throughput), dtype=np.float64) - shares
        integral = np.array(self.integral, dtype=np.float64) + errors
        deltas = self.pid_kp * errors + self.pid_ki * integral
        cap = self.max_change / self.world_size
        scale = min(1.0, cap / max(float(np.abs(deltas).max()), 1e-300))
        if scale == 1.0:  # a capped move does not integrate (anti-windup)
            self.integral = integral.tolist()
        floor = 0.001 / self.world_size
        moved = shares + scale * deltas
        self.shares = _normalised(np.where(floor > moved, floor, moved))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "shares": list(self.shares), "throughput": list(self.throughput),
                "integral": list(self.integral), "window": self.window.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.shares, self.throughput = list(state["shares"]), list(state["throughput"])
        self.integral = list(state["integral"])
        self.window.load_state_dict(state["window"])


BALANCERS: dict[str, type[Balancer]] = {cls.name: cls for cls in (EqualBalancer, WeightsBalancer, DBSBalancer,
                                                                   PIDBalancer, ModelBalancer)}


def build_balancer(name: str, world_size: int, *, rank_weights: Sequence[float] | None = None,
                   min_rank_batch: int = 1, max_rank_batch: int | None = None, **options) -> Balancer:
    """The balancer called `name`; options a balancer does not take are ignored."""
    cls = registered(BALANCERS, "balancer", name)
    return cls(world_size, min_rank_batch=min_rank_batch, max_rank_batch=max_rank_batch,
               **taken_options(cls, {**options, "rank_weights": rank_weights}))
