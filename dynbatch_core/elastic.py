"""What lets a run change its number of ranks: find the newest checkpoint wherever it is, and per-node settings.

    found = newest_checkpoint(run_dir)        # collective: ResumeState(folder, state) or None
    config = with_node_slowdowns(config)      # collective: --slowdown from each node's DYNBATCH_NODE_SLOWDOWN

A checkpoint is one file written by rank 0 (checkpoint.py). Nodes that share the run folder all see it; nodes that
do not (each has its own --out) see only what they wrote while they were rank 0, and after a rendezvous round rank
0 may be another node. So every rank reports the newest checkpoint it sees, and the rank that holds the newest one
loads it and broadcasts the state; when every rank sees the same one, each loads its own copy.

torchrun fixes its arguments at launch and renumbers ranks every round, so a per-rank flag such as --slowdown
cannot be given for the new world size. Each node's environment can: DYNBATCH_NODE_SLOWDOWN=3 on a node makes its
ranks 3x slower (emulated), and the ranks gather the list in rank order.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch.distributed as dist

from .checkpoint import STATE_FILE, latest_checkpoint, load_checkpoint
from .config import RunConfig

NODE_SLOWDOWN = "DYNBATCH_NODE_SLOWDOWN"


@dataclasses.dataclass
class ResumeState:
    folder: Path    # where the state was read (on the rank that loaded it)
    state: dict     # checkpoint.load_checkpoint's dict


def newest_checkpoint(run_dir: Path) -> ResumeState | None:
    """Collective: the newest published checkpoint any rank sees in its run folder, loaded on every rank."""
    try:
        found, error = latest_checkpoint(run_dir), None
    except ValueError as unreadable:
        found, error = None, str(unreadable)
    mine = (found[1]["step"], str(found[0])) if found is not None else (-1, "")
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (mine, error))
    errors = [f"rank {rank}: {text}" for rank, (_, text) in enumerate(seen) if text]
    if errors:
        raise ValueError("; ".join(errors))
    newest = max(step for (step, _), _ in seen)
    if newest < 0:
        return None
    if all(step == newest for (step, _), _ in seen):  # a shared folder (or identical copies): each loads its own
        return ResumeState(Path(mine[1]), load_checkpoint(Path(mine[1]) / STATE_FILE))
    holder = next(rank for rank, ((step, _), _) in enumerate(seen) if step == newest)
    box = [None]
    if dist.get_rank() == holder:
        try:
            box = [(load_checkpoint(Path(mine[1]) / STATE_FILE), None)]
        except ValueError as unreadable:
            box = [(None, str(unreadable))]
    dist.broadcast_object_list(box, src=holder)
    state, error = box[0]
    if error:
        raise ValueError(error)
    return ResumeState(Path(seen[holder][0][1]), state)


def with_node_slowdowns(config: RunConfig) -> RunConfig:
    """Collective (torchrun): --slowdown from each node's DYNBATCH_NODE_SLOWDOWN (unset: 1, full speed)."""
    text = os.environ.get(NODE_SLOWDOWN)
    try:
        mine = 1.0 if text is None else float(text)
        problem = None if 1.0 <= mine < math.inf else f"must be >= 1 (1 = full speed), got {text!r}"
    except ValueError:
        mine, problem = 1.0, f"must be a number >= 1, got {text!r}"
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (text is not None, mine, problem))
    problems = [f"rank {rank}: {NODE_SLOWDOWN} {problem}" for rank, (_, _, problem) in enumerate(gathered) if problem]
    if problems:
        raise ValueError("; ".join(problems))
    if not any(given for given, _, _ in gathered):
        return config
    if config.slowdown is not None or config.slowdown_trace is not None:
        raise ValueError(f"give per-node slowdowns either with {NODE_SLOWDOWN} or with --slowdown/--slowdown-trace, "
                         "not both")
    return dataclasses.replace(config, slowdown=tuple(factor for _, factor, _ in gathered))
