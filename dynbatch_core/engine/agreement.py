"""Decisions every rank shares: rank 0 decides, the others receive its answer.

    decision = decided_by_rank0(lambda: [64, 1.0], 2, device=device)      # every rank: rank 0's [64, 1.0]
    split = decided_by_rank0(lambda: balancer.split(64), world_size, device=device, integers=True)
    check_ranks_agree({"global batch": 64, "split": [16, 48], "step": 120}, where="at the start of epoch 3")

Why rank 0 decides and broadcasts instead of every rank recomputing: the inputs of a decision are not always the
same on every rank (each rank times its own epoch; rank 0 starts every epoch a little later because it publishes
checkpoints), and even identical inputs give identical outputs only if every node's math library rounds alike
(`math.log` in `probe`, float sums in the balancers; mixed hardware does not promise that). Two ranks that decide
different global batches or splits cut different slices and end in a collective that never matches: a hang. One
small broadcast per decision makes agreement hold by construction; every schedule, balancer and adaptive rule goes
through `decided_by_rank0`. `check_ranks_agree` is the cheap guard on top: once per epoch it compares what every
rank holds and fails with one line naming the disagreement instead of hanging.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decided_by_rank0(decide: Callable[[], Sequence[float]], count: int, *, device: torch.device | str = "cpu",
                     integers: bool = False) -> list:
    """Rank 0's `decide()` (`count` numbers), on every rank, in one broadcast; other ranks do not call `decide`.

    Values travel as float64, exact for integers below 2^53; `integers=True` returns ints.
    """
    if not _distributed():
        values = list(decide())
    else:
        payload = torch.tensor(list(decide()) if dist.get_rank() == 0 else [0.0] * count, dtype=torch.float64,
                               device=device)
        if payload.numel() != count:
            raise ValueError(f"decided_by_rank0: the decision has {payload.numel()} values, expected {count}")
        dist.broadcast(payload, src=0)
        values = payload.cpu().tolist()
    return [int(round(v)) for v in values] if integers else [float(v) for v in values]


def check_ranks_agree(values: dict[str, object], *, where: str = "") -> None:
    """Collective: raise RuntimeError naming every rank's values unless all ranks hold exactly the same `values`."""
    if not _distributed():
        return
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, values)  # once per epoch: a pickled dict is cheap enough
    if all(other == held[0] for other in held):
        return
    names = " / ".join(values)
    described = "; ".join(f"rank {rank}: " + ", ".join(f"{k}={v}" for k, v in other.items())
                          for rank, other in enumerate(held))
    raise RuntimeError(f"ranks disagree on {names}{' ' + where if where else ''} ({described}); every decision must "
                       "come from decided_by_rank0")


def max_over_ranks(value: float, *, device: torch.device | str = "cpu") -> float:
    """The largest of every rank's `value` (e.g. the epoch's seconds: the slowest rank's)."""
    if not _distributed():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
