"""What every balancer is: the Balancer interface (split, observe, end_epoch, state) and the integer split by
largest remainder that turns float shares into per-rank sizes. The balancers themselves: balancers.py (equal,
weights, dbs, pid) and model_balancer.py (model).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .cost_model import AffineCost, move_units


SMALL_SPLIT = 48   # ranks: up to this many, Python lists beat numpy's cost per call (~2x at 8 ranks)


def largest_remainder_split(total: int, weights: Sequence[float], *, min_size: int = 1,
                            max_size: int | None = None) -> list[int]:
    """Integers proportional to `weights` that sum to `total`, each in [min_size, max_size].

    Each size starts at its quota total w_i / sum(w) rounded down and clamped; then units go one at a time to the rank
    with the largest quota - size (below max_size), or come back one at a time from the smallest (above min_size).
    Ties go to the lower rank, so the result is a pure function of the inputs. O(n log n) (cost_model.move_units).
    """
    count = len(weights)
    values = None if count <= SMALL_SPLIT else np.array(weights, dtype=np.float64)
    negative = any(w < 0 for w in weights) if values is None else bool((values < 0).any())
    weight_total = sum(weights)
    if count == 0 or negative or weight_total <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    upper = math.inf if max_size is None else max_size
    if total < count * min_size or total > count * upper:
        raise ValueError(f"cannot split {total} into {count} sizes within [{min_size}, {max_size}]")
    weight_sum = float(weight_total)
    if values is None:
        quotas = [total * w / weight_sum for w in weights]
        sizes = [int(min(max(math.floor(q), min_size), upper)) for q in quotas]
    else:   # the same floats, elementwise
        with np.errstate(invalid="ignore", over="ignore"):
            quotas = total * values / weight_sum
        if not np.isfinite(quotas).all():
            [math.floor(quota) for quota in quotas.tolist()]   # raises what math.floor raises on nan or inf
        sizes = np.floor(quotas)
        sizes = np.where(min_size > sizes, min_size, sizes)
        sizes = np.where(upper < sizes, upper, sizes).astype(np.int64)
    missing = total - _sum(sizes)
    if missing > 0:  # grow the largest quota - size, ties to the lower rank
        sizes = move_units(sizes, math.ceil(missing), +1, lambda quota, size: -(quota - size), (quotas,),
                           lambda size: size < upper)
        missing = total - _sum(sizes)
    if missing < 0:  # shrink the smallest quota - size, ties to the lower rank
        sizes = move_units(sizes, math.ceil(-missing), -1, lambda quota, size: quota - size, (quotas,),
                           lambda size: size > min_size)
    return sizes if values is None else sizes.tolist()


def _sum(sizes: list[int] | np.ndarray) -> int:
    return sum(sizes) if isinstance(sizes, list) else int(sizes.sum())


class Balancer:
    """Base class: an equal split, no state. Subclasses override `weights` and, if they learn, `observe`."""

    name = "equal"
    options: tuple[str, ...] = ()  # the build_balancer options this balancer takes

    def __init__(self, world_size: int, *, min_rank_batch: int = 1, max_rank_batch: int | None = None):
        self.world_size = world_size
        self.min_rank_batch = min_rank_batch
        self.max_rank_batch = max_rank_batch

    def weights(self) -> list[float]:
        return [1.0] * self.world_size

    def split(self, global_batch: int) -> list[int]:
        return largest_remainder_split(global_batch, self.weights(), min_size=self.min_rank_batch,
                                       max_size=self.max_rank_batch)

    def observe(self, compute_s: Sequence[float], rank_batches: Sequence[int]) -> None:
        """One step's all-gathered measurements (seconds of compute per rank, samples per rank)."""

    def end_epoch(self) -> None:
        """Called on every rank after the last step of an epoch."""

    def cost_line(self, rank: int) -> AffineCost | None:
        """The fitted step-time line of `rank`, for balancers that model one."""
        return None

    def state_dict(self) -> dict:
        return {"balancer": self.name, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["balancer"], state["world_size"]) != (self.name, self.world_size):
            raise ValueError(f"balancer state is for {state['balancer']!r} on {state['world_size']} ranks, this is "
                             f"{self.name!r} on {self.world_size}")
