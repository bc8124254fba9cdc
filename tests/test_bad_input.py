"""Every invalid value or combination exits with code 2 and one line, before any process is spawned."""
import os
import subprocess
import sys

import pytest

from dynbatch_core import RunConfig, run
from dynbatch_core.cli import main

BASE = ["train", "--dataset", "synthetic", "--model", "resnet8", "--epochs", "1", "--no-progress"]

BAD_INPUTS = {
    "world size below 1": (["--world-size", "0"], "--world-size must be >= 1"),
    "batch below world size": (["--world-size", "4", "--batch-size", "3"], "smaller than --world-size 4"),
    "weights of wrong length": (["--world-size", "2", "--rank-weights", "1,2,3"], "--rank-weights needs 2"),
    "non-positive weight": (["--world-size", "2", "--rank-weights", "1,0"], "--rank-weights entries must be > 0"),
    "slowdown of wrong length": (["--world-size", "2", "--slowdown", "1"], "--slowdown needs 2"),
    "non-positive slowdown": (["--world-size", "2", "--slowdown", "1,-3"], "--slowdown entries must be >= 1"),
    "unknown dataset": (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose from mnist"),
    "unknown model": (["--model", "vgg"], "unknown model 'vgg'; choose from"),
    "unknown schedule": (["--schedule", "sometimes"], "unknown schedule 'sometimes'; choose from static"),
    "unknown balancer": (["--balancer", "magic"], "unknown balancer 'magic'; choose from equal"),
    "missing data": (["--dataset", "mnist", "--train-samples", "60000"], "DYNBATCH_DATA"),
    "cuda without gpus": (["--device", "cuda", "--world-size", "2"], "--device cuda needs one GPU per rank"),
    "unwritable out": (["--out", "/proc/dynbatch-run"], "--out /proc/dynbatch-run: cannot create or write"),
    "not a number": (["--world-size", "two"], "invalid int value"),
    "step cost without sample cost": (["--emulated-step-ms", "5"], "--emulated-step-ms must be >= 0 and needs "
                                                                   "--emulated-sample-ms"),
    "min batch beyond the rank bound": (["--world-size", "2", "--batch-size", "8", "--max-rank-batch", "4",
                                         "--min-batch", "16"], "cannot hold --batch-size 8 / --min-batch 16"),
    "model window too short": (["--balancer", "model", "--model-window", "2"], "model_window=2 must be >= 3"),
    "emulated clock without a cost": (["--skip-emulated-sleep"], "--skip-emulated-sleep needs --emulated-sample-ms"),
    "negative precise-BN samples": (["--eval-bn-samples", "-1"], "--eval-bn-samples must be >= 0, got -1"),
}


@pytest.fixture
def no_spawn(monkeypatch):
    """Fail the test if any rank is started: launch.py calls mp.start_processes (spawn is patched too)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a process was spawned for bad input")
    monkeypatch.setattr("torch.multiprocessing.start_processes", refuse)
    monkeypatch.setattr("torch.multiprocessing.spawn", refuse)


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors (wrong types) exit from inside parse_args
        return stop.code


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_before_spawning(case, no_spawn, capsys):
    flags, expected = BAD_INPUTS[case]
    assert exit_code(BASE + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err


def test_run_raises_value_error_with_the_same_message(no_spawn):
    with pytest.raises(ValueError, match="--slowdown needs 2"):
        run(RunConfig(dataset="synthetic", world_size=2, slowdown=(1.0,)))


def test_no_spawn_fixture_catches_the_spawn_of_a_valid_run(no_spawn, tmp_path):
    """Guard against a vacuous fixture: a valid run gets past validation and is stopped where it starts ranks."""
    config = RunConfig(dataset="synthetic", model="resnet8", world_size=1, epochs=1, train_samples=64,
                       test_samples=32, initial_batch=32, progress=False, out=str(tmp_path / "r"))
    with pytest.raises(AssertionError, match="a process was spawned"):
        run(config)


def test_cli_process_exit_code_is_2_on_bad_input():
    completed = subprocess.run([sys.executable, "-m", "dynbatch_core", *BASE, "--world-size", "0"],
                               capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "python -m dynbatch_core train: error: --world-size must be >= 1, got 0"]


def test_help_lists_models_and_states_defaults():
    completed = subprocess.run([sys.executable, "-m", "dynbatch_core", "train", "--help"], capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0
    assert "resnet20" in completed.stdout and "resnet152" in completed.stdout
    assert "(default: 64)" in completed.stdout  # --batch-size
