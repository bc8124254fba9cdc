"""Decisions every rank shares: rank 0 decides, the others receive its answer.

    decision = decided_by_rank0(lambda: [64, 1.0], device=device)        # every rank: rank 0's [64, 1.0]
    split = decided_by_rank0(lambda: balancer.split(64), device=device)  # every rank: rank 0's split, as ints
    check_ranks_agree({"global batch": 64, "split": [16, 48], "step": 120}, device=device, where="epoch 3")
    check_run_dir_shared(run_dir, rank=rank, device=device)              # torchrun: one run folder for all nodes

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

import uuid
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

SHARED_TOKEN_FILE = ".run-folder-token"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decided_by_rank0(decide: Callable[[], Sequence[float]], *, device: torch.device | str = "cpu",
                     integers: bool = False) -> list:
    """Rank 0's `decide()` (a list of numbers), on every rank; other ranks do not call `decide`.

    Values travel as float64, exact for integers below 2^53; `integers=True` returns ints.
    """
    if not _distributed():
        values = list(decide())
    else:
        if dist.get_rank() == 0:
            values = list(decide())
            header = torch.tensor([float(len(values))], dtype=torch.float64, device=device)
        else:
            header = torch.zeros(1, dtype=torch.float64, device=device)
        # The length first: rank 0 alone knows how many values the decision has.
        dist.broadcast(header, src=0)
        payload = torch.tensor(values, dtype=torch.float64, device=device) if dist.get_rank() == 0 \
            else torch.zeros(int(header.item()), dtype=torch.float64, device=device)
        dist.broadcast(payload, src=0)
        values = payload.cpu().tolist()
    return [int(round(v)) for v in values] if integers else [float(v) for v in values]


def _flatten(values: dict[str, float | Sequence[float]]) -> tuple[list[float], list[tuple[str, int]]]:
    flat, layout = [], []
    for name, value in values.items():
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        flat.extend(float(v) for v in items)
        layout.append((name, len(items) if isinstance(value, (list, tuple)) else -1))
    return flat, layout


def _unflatten(row: list[float], layout: list[tuple[str, int]]) -> dict:
    out, offset = {}, 0
    for name, count in layout:
        if count < 0:
            out[name] = _plain(row[offset])
            offset += 1
        else:
            out[name] = [_plain(v) for v in row[offset:offset + count]]
            offset += count
    return out


def _plain(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def check_ranks_agree(values: dict[str, float | Sequence[float]], *, device: torch.device | str = "cpu",
                      where: str = "") -> None:
    """Collective: raise RuntimeError naming every rank's values unless all ranks hold exactly the same `values`.

    Every rank must pass the same keys with lists of the same lengths.
    """
    if not _distributed():
        return
    flat, layout = _flatten(values)
    mine = torch.tensor(flat, dtype=torch.float64, device=device)
    rows = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    rows = [row.cpu().tolist() for row in rows]
    if all(row == rows[0] for row in rows):
        return
    names = [name for name, _ in layout]
    held = "; ".join(f"rank {rank}: " + ", ".join(f"{k}={v}" for k, v in _unflatten(row, layout).items())
                     for rank, row in enumerate(rows))
    raise RuntimeError(f"ranks disagree on {' / '.join(names)}{' ' + where if where else ''} ({held}); every "
                       "decision must come from decided_by_rank0")


def max_over_ranks(value: float, *, device: torch.device | str = "cpu") -> float:
    """The largest of every rank's `value` (e.g. the epoch's seconds: the slowest rank's)."""
    if not _distributed():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def check_run_dir_shared(run_dir: Path, *, device: torch.device | str = "cpu") -> None:
    """Collective: refuse (ValueError, one line) a run folder that is not the same folder on every rank.

    Rank 0 writes a fresh token into the folder; every rank reads it back. Multi-node runs need a shared run folder
    (a network filesystem): checkpoints, the latest.json pointer and resume all live there.
    """
    if not _distributed():
        return
    run_dir = Path(run_dir)
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SHARED_TOKEN_FILE).write_text(token[0])
    dist.barrier()
    try:
        seen = (run_dir / SHARED_TOKEN_FILE).read_text()
    except OSError:
        seen = ""
    missing = torch.tensor([0.0 if seen == token[0] else 1.0], dtype=torch.float64, device=device)
    ranks = [torch.zeros_like(missing) for _ in range(dist.get_world_size())]
    dist.all_gather(ranks, missing)
    dist.barrier()
    if dist.get_rank() == 0:
        (run_dir / SHARED_TOKEN_FILE).unlink(missing_ok=True)
    apart = [rank for rank, flag in enumerate(ranks) if flag.item() > 0]
    if apart:
        raise ValueError(f"run folder {run_dir} is not shared: rank(s) {', '.join(map(str, apart))} do not see rank "
                         "0's files there; multi-node runs need one run folder on a filesystem every node shares "
                         "(e.g. NFS)")
