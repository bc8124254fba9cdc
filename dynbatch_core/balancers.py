"""Balancers: split a global batch B into per-rank sizes b_0..b_{n-1} with sum b_i = B.

    balancer = build_balancer("weights", world_size=2, rank_weights=[3, 13])
    balancer.split(16)                                   # -> [3, 13]
    balancer.observe(compute_s=[0.12, 0.36], rank_batches=[8, 8])   # after every step, same values on every rank
    balancer.end_epoch()

Every rank holds its own balancer and feeds it the same all-gathered measurements (each rank's compute time and
batch size of the last step, never its wait time), so every rank decides the same split without talking. Sizes are
integers >= min_rank_batch (and <= max_rank_batch when given) rounded by largest remainder.
"""
from __future__ import annotations

import math
from typing import Sequence


def largest_remainder_split(total: int, weights: Sequence[float], *, min_size: int = 1,
                            max_size: int | None = None) -> list[int]:
    """Integers proportional to `weights` that sum to `total`, each in [min_size, max_size].

    Ties go to the lower rank, so the result is a pure function of the inputs.
    """
    count = len(weights)
    if count == 0 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    upper = math.inf if max_size is None else max_size
    if total < count * min_size or total > count * upper:
        raise ValueError(f"cannot split {total} into {count} sizes within [{min_size}, {max_size}]")
    weight_sum = float(sum(weights))
    quotas = [total * w / weight_sum for w in weights]
    sizes = [int(min(max(math.floor(q), min_size), upper)) for q in quotas]
    while sum(sizes) < total:
        grow = max((i for i in range(count) if sizes[i] < upper), key=lambda i: (quotas[i] - sizes[i], -i))
        sizes[grow] += 1
    while sum(sizes) > total:
        shrink = min((i for i in range(count) if sizes[i] > min_size), key=lambda i: (quotas[i] - sizes[i], i))
        sizes[shrink] -= 1
    return sizes


class Balancer:
    """Base class: an equal split, no state. Subclasses override `weights` and, if they learn, `observe`."""

    name = "equal"

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

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EqualBalancer(Balancer):
    """b_i = B / n, the remainder to the lowest ranks."""

    name = "equal"


class WeightsBalancer(Balancer):
    """Fixed shares given by the user (e.g. --rank-weights 3,13), as a DBS-style static split."""

    name = "weights"

    def __init__(self, world_size: int, *, rank_weights: Sequence[float], **bounds):
        super().__init__(world_size, **bounds)
        if len(rank_weights) != world_size:
            raise ValueError(f"rank_weights needs {world_size} entries, got {len(rank_weights)}")
        self.rank_weights = [float(w) for w in rank_weights]

    def weights(self) -> list[float]:
        return list(self.rank_weights)


BALANCERS: dict[str, type[Balancer]] = {cls.name: cls for cls in (EqualBalancer, WeightsBalancer)}


def build_balancer(name: str, world_size: int, *, rank_weights: Sequence[float] | None = None,
                   min_rank_batch: int = 1, max_rank_batch: int | None = None, **options) -> Balancer:
    """The balancer called `name`; options a balancer does not take are ignored."""
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; choose from {', '.join(BALANCERS)}")
    bounds = {"min_rank_batch": min_rank_batch, "max_rank_batch": max_rank_batch}
    if name == "weights":
        return WeightsBalancer(world_size, rank_weights=rank_weights or [1.0] * world_size, **bounds)
    return BALANCERS[name](world_size, **bounds)
