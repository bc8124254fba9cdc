"""Checkpoints: everything a rank needs to continue a run exactly, one file per rank, written atomically.

    save_checkpoint(run_dir, rank=rank, world_size=world_size, step=120, payload=state)   # every rank, collectively
    found = latest_checkpoint(run_dir)          # (folder, meta) of the newest complete checkpoint, or None
    state = load_checkpoint(found[0] / f"rank{rank}.pt")

Layout: run_dir/checkpoints/step-00000120/rank{r}.pt, and run_dir/checkpoints/latest.json naming the newest folder
in which *every* rank's file is complete (rank 0 writes it after a barrier, by atomic rename), so a run killed
while writing resumes from the previous checkpoint. latest.json also lists the KEEP = 2 most recently published
folders; those are kept, and every other folder older than the newest is deleted (see prune_checkpoints), so a
partial folder left by a failed attempt never takes the place of a published checkpoint.

Payloads hold only tensors and plain containers, so they load with torch.load(..., weights_only=True).
"""
from __future__ import annotations

import json
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .metrics import write_atomic, write_json

FORMAT = "dynbatch-checkpoint-1"
KEEP = 2


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, *, rank: int, world_size: int, step: int, payload: dict) -> None:
    """Collective: every rank writes its file, then rank 0 points latest.json at the new folder."""
    folder = checkpoints_root(run_dir) / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "rank": rank, "world_size": world_size, "step": step, **payload}
    write_atomic(folder / f"rank{rank}.pt", lambda tmp: torch.save(payload, tmp))
    dist.barrier()
    if rank == 0:
        root = checkpoints_root(run_dir)
        published = ([name for name in _published(root) if name != folder.name] + [folder.name])[-KEEP:]
        write_json(root / "latest.json",
                   {"folder": folder.name, "step": step, "world_size": world_size, "published": published})
        prune_checkpoints(root, published)


def prune_checkpoints(root: Path, published: list[str], keep: int = KEEP) -> None:
    """Keep the `keep` most recently published folders (`published` lists them oldest first) and delete every other
    step-* folder older than the newest of them: older checkpoints and partial folders of failed attempts alike.
    Folders newer than it (a failed attempt's partial one, which the run overwrites when it gets there) stay."""
    kept = published[-keep:]
    newest = _step_of(kept[-1])
    for folder in Path(root).glob("step-*"):
        step = _step_of(folder.name)
        if folder.is_dir() and folder.name not in kept and step is not None and step < newest:
            shutil.rmtree(folder, ignore_errors=True)


def _step_of(name: str) -> int | None:
    try:
        return int(name.removeprefix("step-"))
    except ValueError:
        return None


def _published(root: Path) -> list[str]:
    """The published folders named by latest.json, oldest first ([] without a readable pointer; a pointer written
    before the list was recorded names only its own folder)."""
    try:
        meta = json.loads((root / "latest.json").read_text())
        return [str(name) for name in meta.get("published", [meta["folder"]])]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return []


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    pointer = checkpoints_root(run_dir) / "latest.json"
    if not pointer.exists():
        return None
    try:
        meta = json.loads(pointer.read_text())
        return checkpoints_root(run_dir) / meta["folder"], meta
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint pointer {pointer} is unreadable ({error}); delete it to start over") from None


def load_checkpoint(path: Path) -> dict:
    """Load one rank's checkpoint; a missing, corrupt or foreign file is a ValueError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {path} is missing") from None
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint file {path} is corrupt or not a dynbatch checkpoint ({first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint file {path} is not a dynbatch checkpoint (format "
                         f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    return state


def capture_rng() -> dict:
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": _to_plain(random.getstate()),
            "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                      "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                      "cached_gaussian": float(numpy_state[4])}}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))


def _to_plain(value):
    return [_to_plain(v) for v in value] if isinstance(value, tuple) else value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
