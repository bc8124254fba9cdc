"""Checkpoints: one file per checkpoint, written by rank 0, that any number of ranks can resume.

    save_checkpoint(run_dir, step=120, world_size=2, state=state)   # rank 0, after gathering every rank's part
    found = latest_checkpoint(run_dir)       # (folder, meta) of the newest published checkpoint, or None
    state = load_checkpoint(found[0] / STATE_FILE)

Layout: run_dir/checkpoints/step-00000120/state.pt and run_dir/checkpoints/latest.json, which names the newest
published folder. The state is written atomically and only then published (latest.json, also by atomic rename), so
a run killed while writing resumes from the previous checkpoint. latest.json also lists the KEEP = 2 most recently
published folders; those are kept, and every other folder older than the newest is deleted (see
prune_checkpoints), so a partial folder left by a failed attempt never takes the place of a published checkpoint.

The state does not depend on the world size: model, optimizer, schedule, sampler cursor (a global position),
progress, history and tables once, plus each rank's own part (batch-norm buffers, RNG, its rows of the current
epoch) as a list that a resume with the same world size restores rank by rank and a resume with another one merges
(train.RankTrainer.resume says how). Payloads hold only tensors and plain containers, so they load with
torch.load(..., weights_only=True).
"""
from __future__ import annotations

import json
import pickle
import random
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..records import write_atomic, write_json

FORMAT = "dynbatch-checkpoint-2"
OLD_FORMATS = {"dynbatch-checkpoint-1": "one file per rank"}
STATE_FILE = "state.pt"
KEEP = 2


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, *, step: int, world_size: int, state: dict) -> Path:
    """Rank 0: write the state, then point latest.json at its folder. Returns the folder."""
    root = checkpoints_root(run_dir)
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "world_size": world_size, "step": step, **state}
    write_atomic(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))
    published = ([name for name in _published(root) if name != folder.name] + [folder.name])[-KEEP:]
    # id: tells two checkpoints of one step apart (run folders that nodes do not share) from copies of one
    write_json(root / "latest.json", {"folder": folder.name, "step": step, "world_size": world_size,
                                      "format": FORMAT, "published": published, "id": uuid.uuid4().hex})
    prune_checkpoints(root, published)
    return folder


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
    """Load a checkpoint's state; a missing, corrupt, foreign or old-format file is a ValueError naming it."""
    path = Path(path)
    if not path.exists() and path.parent.is_dir():
        old = sorted(path.parent.glob("rank*.pt"))
        if old:
            raise ValueError(f"checkpoint {path.parent} has the older format dynbatch-checkpoint-1 (one file per "
                             "rank); resume it with that version of dynbatch, or start the run over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {path} is missing") from None
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint file {path} is corrupt or not a dynbatch checkpoint ({first_line})") from None
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found in OLD_FORMATS:
        raise ValueError(f"checkpoint file {path} has the older format {found} ({OLD_FORMATS[found]}); resume it "
                         "with that version of dynbatch, or start the run over")
    if found != FORMAT:
        raise ValueError(f"checkpoint file {path} is not a dynbatch checkpoint (format {found!r})")
    return state


def capture_rng() -> dict:
    """This process's random generators: torch's CPU one, the current GPU's (once CUDA is in use), Python's, numpy's."""
    numpy_state = np.random.get_state()
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() and torch.cuda.is_initialized() else {}
    return {"torch": torch.get_rng_state(), "python": _to_plain(random.getstate()), **cuda,
            "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                      "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                      "cached_gaussian": float(numpy_state[4])}}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():   # a CPU checkpoint resumed on a GPU keeps the GPU's seed
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(_to_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))


def _to_plain(value):
    return [_to_plain(v) for v in value] if isinstance(value, tuple) else value


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
