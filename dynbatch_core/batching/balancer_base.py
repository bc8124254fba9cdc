"""What every balancer is: the Balancer interface (split, observe, end_epoch, state) and the integer split by
largest remainder that turns float shares into per-rank sizes. The balancers themselves: balancers.py (equal,
weights, dbs, pid) and model_balancer.py (model).
"""
from __future__ import annotations

import math
from typing import Sequence

from .cost_model import AffineCost


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
