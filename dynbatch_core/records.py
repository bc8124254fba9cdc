"""The run record, the one contract between the engine and the study: the run folder (where a run writes
config.json, steps.csv, epochs.csv, model.pt), its tidy tables (steps.csv: one row per step and rank; epochs.csv:
one row per epoch), atomic writes, the launcher's progress channel, and reading a run back.

    run_dir = prepare_run_dir(out=None, overwrite=False, label="mnist-resnet20")   # runs/20261125-183000-mnist-resnet20
    result = read_run("runs/my-run")          # RunResult(run_dir, config, steps, epochs)
    result.epochs[["epoch", "global_batch", "test_acc", "wall_s"]]

A default folder is new and unique (two runs started at once never share one); a named folder that already holds
files is refused unless overwrite is set. Every file is written to a temporary name and renamed into place, so a
killed run never leaves a truncated file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import with_current_names

PROGRESS_FILE = "progress.json"  # rank 0's latest step, read by the launching process to draw its progress bar
STEP_COLUMNS = ["epoch", "step", "rank", "world_size", "rank_batch", "global_batch",
                "slowdown",                     # the emulated factor k this rank ran at (--slowdown, --slowdown-trace)
                "compute_s", "wait_s", "loss", "lr",
                "model_a_s", "model_c_s",       # the model balancer's fitted line t = a + c b for this rank (else empty)
                "rank_grad_sq", "global_grad_sq"]   # --measure-noise: |mean gradient|^2 of this rank's slice, of the step
EPOCH_COLUMNS = ["epoch", "global_batch", "steps", "samples", "train_loss", "test_loss", "test_acc", "world_size",
                 "epoch_s", "wall_s", "samples_per_s",
                 "noise_scale", "noise_gradient_sq", "noise_trace", "noise_missing",  # --measure-noise (noise_scale.py)
                 "schedule_score"]   # the probe's rate r_e, the score schedule's S_e (empty for other schedules)


@dataclass
class RunResult:
    run_dir: Path
    config: dict
    steps: pd.DataFrame    # STEP_COLUMNS
    epochs: pd.DataFrame   # EPOCH_COLUMNS


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path onto path (atomic on POSIX)."""
    path = Path(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_table(path: Path, rows: list[dict], columns: list[str]) -> None:
    table = pd.DataFrame(rows, columns=columns)
    write_atomic(path, lambda tmp: table.to_csv(tmp, index=False))


def write_json(path: Path, payload: dict) -> None:
    def dump(tmp):
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
    write_atomic(path, dump)


class ProgressFile:
    """Rank 0 reports where it is, at most once a second, as a small JSON file the launcher polls."""

    def __init__(self, path: Path, every_s: float = 1.0):
        self.path, self.every_s, self.last = Path(path), every_s, 0.0

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def report(self, **values) -> None:
        self.last = time.monotonic()
        write_json(self.path, values)

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def read_run(run_dir: str | os.PathLike) -> RunResult:
    run_dir = Path(run_dir)
    config = with_current_names(json.loads((run_dir / "config.json").read_text()))
    steps = pd.read_csv(run_dir / "steps.csv") if (run_dir / "steps.csv").exists() else pd.DataFrame(columns=STEP_COLUMNS)
    epochs = pd.read_csv(run_dir / "epochs.csv") if (run_dir / "epochs.csv").exists() else pd.DataFrame(columns=EPOCH_COLUMNS)
    return RunResult(run_dir, config, steps, epochs)


RUNS_ROOT = Path("runs")
RUN_FILES = ("config.json", "steps.csv", "epochs.csv", "model.pt", "progress.json", "checkpoints")


def prepare_run_dir(out: str | None, *, overwrite: bool, label: str) -> Path:
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1000):
            candidate = RUNS_ROOT / (f"{stamp}-{label}" + (f"-{attempt}" if attempt else ""))
            try:
                candidate.mkdir(parents=True)
                return candidate.resolve()
            except FileExistsError:
                continue
        raise RuntimeError(f"could not create a new run folder under {RUNS_ROOT.resolve()}")
    run_dir = Path(out).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: folder exists and is not empty; pass --overwrite to write into it, "
                         "or choose another folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:  # overwrite: nothing of the previous run may leak into this one (a stale checkpoint!)
        stale = run_dir / name
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    return run_dir.resolve()


def git_commit() -> str | None:
    """The commit of the dynbatch_core checkout (with '-dirty' if it has changes), or None outside git.

    Changes under outputs/ do not count: they are what `report` writes while it runs, not what produced them."""
    import subprocess
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)outputs"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")
