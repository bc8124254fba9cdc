"""What lets a run change its number of ranks: find the newest checkpoint wherever it is, and per-node settings.

    found = newest_checkpoint(run_dir)        # collective: ResumeState(folder, state) or None
    config = with_node_slowdowns(config)      # collective: --slowdown from each node's DYNBATCH_NODE_SLOWDOWN

A checkpoint is one file written by rank 0 (checkpoint.py). Nodes that share the run folder all see it; nodes that
do not (each has its own --out) see only what they wrote while they were rank 0, and after a rendezvous round rank
0 may be another node. So every rank reports the newest checkpoint it sees, with its id (latest.json; a hash of the
file for checkpoints written before ids), and the first rank that holds the newest one loads it and broadcasts the
state. Only when every rank sees the very same checkpoint (a shared folder) does each load its own copy: two
checkpoints of the same step in two folders (a node that trained again from an older state) are not the same.

A later torchrun round whose ranks find no checkpoint although this job published one (the node that held it left,
and the folders are not shared) stops with one line instead of training again from step 0: rank 0 records every
published step in torchrun's rendezvous store, which outlives the rounds (check_nothing_lost).

torchrun fixes its arguments at launch and renumbers ranks every round, so a per-rank flag such as --slowdown
cannot be given for the new world size. Each node's environment can: DYNBATCH_NODE_SLOWDOWN=3 on a node makes its
ranks 3x slower (emulated), and the ranks gather the list in rank order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path

import torch.distributed as dist

from .checkpoint import STATE_FILE, latest_checkpoint, load_checkpoint
from ..config import RunConfig

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
    mine = (found[1]["step"], str(found[0]), checkpoint_id(*found)) if found is not None else (-1, "", "")
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (mine, error))
    errors = [f"rank {rank}: {text}" for rank, (_, text) in enumerate(seen) if text]
    if errors:
        raise ValueError("; ".join(errors))
    newest = max(step for (step, _, _), _ in seen)
    if newest < 0:
        return None
    if all((step, ident) == (newest, mine[2]) for (step, _, ident), _ in seen):   # one checkpoint, seen by all
        return ResumeState(Path(mine[1]), load_checkpoint(Path(mine[1]) / STATE_FILE))
    holder = next(rank for rank, ((step, _, _), _) in enumerate(seen) if step == newest)
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


def checkpoint_id(folder: Path, meta: dict) -> str:
    """What tells checkpoints apart: the id latest.json gives it, or (written before ids) a hash of its file."""
    if meta.get("id"):
        return str(meta["id"])
    digest = hashlib.sha256()
    with open(Path(folder) / STATE_FILE, "rb") as state:
        for block in iter(lambda: state.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PUBLISHED_KEY = "dynbatch/published-step"


def record_published(store, step: int) -> None:
    """Rank 0 under torchrun, after publishing a checkpoint: note its step where later rounds will look."""
    if store is not None:
        store.set(PUBLISHED_KEY, str(step))


def check_nothing_lost(store, found: ResumeState | None, run_dir: Path) -> None:
    """A torchrun round must not start over from an older state than this job already published (ValueError)."""
    if store is None or not store.check([PUBLISHED_KEY]):
        return
    published = int(store.get(PUBLISHED_KEY).decode())
    resumed = -1 if found is None else int(found.state["step"])
    if resumed < published:
        where = "no checkpoint" if found is None else f"only the checkpoint of step {resumed}"
        raise ValueError(f"this torchrun job published a checkpoint at step {published}, but its ranks find {where} "
                         f"in their run folders ({run_dir} here): the node that held it left and the folders are not "
                         "shared; share --out between nodes, or copy its checkpoints/ folder here, and start again")


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
