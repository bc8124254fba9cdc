"""Runs finish or fail as a whole, fast and clean; checkpoints resume bit-exactly; outputs are never half-written."""
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
from dynbatch_core import RunConfig, RunFailed, run
from dynbatch_core.engine.checkpoint import latest_checkpoint
from dynbatch_core.records import write_atomic

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def small_config(tmp_path, name, **overrides):
    values = dict(dataset="synthetic", model="resnet8", world_size=2, epochs=2, train_samples=512, test_samples=64,
                  initial_batch=32, progress=False, out=str(tmp_path / name))
    return RunConfig(**{**values, **overrides})


def worker_processes():
    """Children of this test process, except multiprocessing's resource tracker (one per parent, by design)."""
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


def assert_no_children_left():
    deadline = time.monotonic() + 10
    while worker_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker_processes() == []


@pytest.mark.parametrize("kind, expected", [("raise", "RuntimeError: injected fault at step 3 on rank 1"),
                                            ("kill", "killed by SIGKILL")])
def test_a_failing_rank_stops_the_run_fast_naming_the_rank(tmp_path, monkeypatch, kind, expected):
    monkeypatch.setenv("DYNBATCH_TEST_HOOKS", "1")
    monkeypatch.setenv("DYNBATCH_FAULT", f"{kind}:1:3")
    started = time.monotonic()
    with pytest.raises(RunFailed) as failure:
        run(small_config(tmp_path, kind, epochs=50))
    assert time.monotonic() - started < 60
    assert failure.value.rank == 1
    assert expected in str(failure.value)
    assert_no_children_left()


def test_a_hanging_rank_fails_the_run_after_the_collective_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNBATCH_TEST_HOOKS", "1")
    monkeypatch.setenv("DYNBATCH_FAULT", "hang:1:3")
    started = time.monotonic()
    with pytest.raises(RunFailed) as failure:
        run(small_config(tmp_path, "hang", epochs=50, timeout_s=5))
    assert time.monotonic() - started < 60
    assert failure.value.rank == 0  # rank 0 gives up waiting for rank 1 in the all-reduce
    assert_no_children_left()


def test_ctrl_c_in_the_cli_stops_every_rank(tmp_path):
    command = [sys.executable, "-m", "dynbatch_core", "train", "--dataset", "synthetic", "--model", "resnet8",
               "--epochs", "100", "--train-samples", "512", "--no-progress", "--out", str(tmp_path / "interrupted")]
    cli = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "interrupted" / "steps.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = rank_processes(cli.pid)
    assert len(ranks) == 2
    cli.send_signal(signal.SIGINT)  # to the parent only, as Jupyter's "interrupt kernel" does
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 130, stderr
    assert f"run stopped by interrupt; 2 rank(s) ended; run folder {tmp_path / 'interrupted'}" in stderr
    assert "Traceback" not in stderr   # one line, not multiprocessing's internals
    assert not any(rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE for rank in ranks)


def test_resume_after_a_kill_mid_epoch_is_bit_exact_with_pid_and_a_changing_schedule(tmp_path, monkeypatch):
    options = dict(epochs=3, balancer="pid", balance_every=2, slowdown=(1.0, 3.0), emulated_sample_ms=0.2,
                   schedule="increasing", checkpoint_every=5)
    reference = run(small_config(tmp_path, "uninterrupted", **options))

    monkeypatch.setenv("DYNBATCH_TEST_HOOKS", "1")
    monkeypatch.setenv("DYNBATCH_FAULT", "kill:1:23")  # epoch 2 runs steps 16..23 at B=64
    with pytest.raises(RunFailed):
        run(small_config(tmp_path, "interrupted", **options))
    assert latest_checkpoint(tmp_path / "interrupted")[1]["step"] == 20
    monkeypatch.delenv("DYNBATCH_FAULT")
    resumed = run(small_config(tmp_path, "interrupted", resume=str(tmp_path / "interrupted"), **options))

    expected = torch.load(reference.run_dir / "model.pt", weights_only=True)
    actual = torch.load(resumed.run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert resumed.steps.query("rank == 0").step.tolist() == list(range(len(reference.steps) // 2))
    columns = ["step", "rank", "rank_batch", "global_batch", "loss", "lr"]
    pd.testing.assert_frame_equal(resumed.steps[columns], reference.steps[columns])
    # the balancer really moved and the schedule really changed B
    assert reference.steps.query("rank == 1").rank_batch.iloc[-1] < reference.steps.query("rank == 0").rank_batch.iloc[-1]
    assert resumed.epochs.global_batch.tolist() == [32, 64, 128]
    assert resumed.steps.groupby("epoch").rank_batch.sum().tolist() == [512, 512, 512]


def test_resume_refuses_a_corrupt_checkpoint_naming_the_file(tmp_path):
    first = run(small_config(tmp_path, "done", epochs=1))
    folder, _ = latest_checkpoint(first.run_dir)
    (folder / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunFailed, match=r"checkpoint file .*state\.pt is corrupt"):
        run(small_config(tmp_path, "done", resume=str(first.run_dir)))
    assert_no_children_left()


def test_existing_run_folder_is_not_overwritten_without_overwrite(tmp_path):
    run(small_config(tmp_path, "taken", epochs=1, max_steps=2))
    with pytest.raises(ValueError, match="pass --overwrite"):
        run(small_config(tmp_path, "taken", epochs=1, max_steps=2))


def test_two_runs_started_at_once_both_succeed_in_their_own_folders(tmp_path):
    command = [sys.executable, "-m", "dynbatch_core", "train", "--dataset", "synthetic", "--model", "resnet8",
               "--epochs", "1", "--train-samples", "256", "--test-samples", "64", "--batch-size", "32",
               "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in runs]
    assert [process.returncode for process in runs] == [0, 0], outputs
    folders = {Path(stdout.strip().splitlines()[-1]) for stdout, _ in outputs}
    assert len(folders) == 2
    for folder in folders:
        assert len(pd.read_csv(folder / "steps.csv")) == 2 * 8


def test_an_interrupted_write_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "epochs.csv"
    target.write_text("epoch,test_acc\n0,0.5\n")

    def write_half_then_die(tmp_name):
        Path(tmp_name).write_text("epoch,te")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, write_half_then_die)
    assert target.read_text() == "epoch,test_acc\n0,0.5\n"
    assert [p.name for p in tmp_path.iterdir()] == ["epochs.csv"]
