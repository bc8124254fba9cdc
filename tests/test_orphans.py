"""SIGKILL to the launcher (a killed notebook kernel) leaves no rank behind, at any moment, and no broken file."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from conftest import rank_processes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def start_cli(run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "dynbatch_core", "train", "--dataset", "synthetic", "--model", "resnet8",
               "--world-size", "2", "--train-samples", "512", "--batch-size", "32", "--no-progress",
               "--checkpoint-every", "4", "--out", str(run_dir), *extra]
    return subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_until(condition, timeout_s: float = 120, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError("timed out waiting")


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_every_file_whole(run_dir: Path) -> None:
    """Every file a reader would open parses (temporary .*.tmp names are never read)."""
    for path in run_dir.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)


def in_evaluation(run_dir: Path) -> bool:
    """Rank 0 reported the run's last step but has not written epochs.csv yet: it is evaluating."""
    try:
        progress = json.loads((run_dir / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return progress["step"] == progress["total_steps"] and not (run_dir / "epochs.csv").exists()


MOMENTS = {
    "start-up": ((), lambda cli, run_dir: len(rank_processes(cli.pid)) == 2),
    "mid-epoch": (("--epochs", "100"), lambda cli, run_dir: (run_dir / "progress.json").exists()),
    # 20000 test images take each rank a few seconds to score
    "evaluation": (("--epochs", "1", "--test-samples", "20000"), lambda cli, run_dir: in_evaluation(run_dir)),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_killing_the_launcher_leaves_no_rank_alive(tmp_path, moment):
    extra, ready = MOMENTS[moment]
    run_dir = tmp_path / moment
    cli = start_cli(run_dir, *extra)
    of_the_run = []   # the ranks, and the fork server that forked them
    try:
        ranks = wait_until(lambda: len(rank_processes(cli.pid)) == 2 and rank_processes(cli.pid))
        of_the_run = list(ranks)
        wait_until(lambda: ready(cli, run_dir))
        assert cli.poll() is None, "the run ended before the moment to kill it"
        of_the_run = ranks + [p for p in psutil.Process(cli.pid).children() if p not in ranks and alive(p)
                              and "resource_tracker" not in " ".join(p.cmdline())]
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(process) for process in of_the_run) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [process.pid for process in of_the_run if alive(process)]
    finally:
        cli.kill()
        for process in of_the_run:
            if alive(process):
                process.kill()
    assert survivors == []
    if moment == "evaluation":
        assert not (run_dir / "epochs.csv").exists()  # really killed during the evaluation
    assert_every_file_whole(run_dir)
