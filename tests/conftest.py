import os
import time
from pathlib import Path

import psutil
import pytest

SHARED_DATA = Path(os.environ.get("DYNBATCH_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist.npz").exists():
        pytest.skip(f"offline data not found at {SHARED_DATA} (set DYNBATCH_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    """Tests say where their data comes from; a developer's DYNBATCH_DATA must not leak in."""
    monkeypatch.delenv("DYNBATCH_DATA", raising=False)


def rank_processes(launcher_pid: int) -> list[psutil.Process]:
    """The ranks a launcher (a CLI, a kernel) runs now: its spawned children, or the children of its fork server."""
    def children(pid):
        try:
            return psutil.Process(pid).children()
        except psutil.NoSuchProcess:
            return []

    def command(process):
        try:
            return " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            return ""

    ranks = []
    for child in children(launcher_pid):
        if "spawn_main" in command(child):
            ranks.append(child)
        elif "forkserver import main" in command(child):
            ranks.extend(children(child.pid))
    return ranks


def processes_with_environment(name: str, value: str, wait_s: float = 10.0) -> list[psutil.Process]:
    """Processes anywhere on the machine whose environment holds name=value, after up to wait_s for them to end:
    what a run left behind, even reparented away from this process (a killed rank's DataLoader workers)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(name) == value and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
