"""The run folder: where a run writes config.json, steps.csv, epochs.csv and model.pt.

    run_dir = prepare_run_dir(out=None, overwrite=False, label="mnist-resnet20")   # runs/20261125-183000-mnist-resnet20

A default folder is new and unique (two runs started at once never share one); a named folder that already holds
files is refused unless overwrite is set.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

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
