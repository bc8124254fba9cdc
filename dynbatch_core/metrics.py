"""Tidy metrics tables and the run folder: steps.csv (one row per step and rank), epochs.csv (one row per epoch).

    result = read_run("runs/my-run")          # RunResult(run_dir, config, steps, epochs)
    result.epochs[["epoch", "global_batch", "test_acc", "wall_s"]]

Every file is written to a temporary name and renamed into place, so a killed run never leaves a truncated file.
"""
from __future__ import annotations

import json
import os
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
