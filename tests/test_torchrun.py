"""The same worker under torchrun: one node, two "nodes" on localhost, and an elastic restart after a SIGKILL."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from dynbatch_core import RunConfig, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
JOB = ["--dataset", "synthetic", "--model", "resnet8", "--epochs", "2", "--train-samples", "512",
       "--test-samples", "128", "--batch-size", "32", "--no-progress"]


def torchrun(*launcher_args, job_args=(), env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "dynbatch_core",
                             "train", *JOB, *job_args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def free_port() -> int:
    """A port for torchrun's --master-port (torchrun binds it itself; a test may accept that small race)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawned_reference(tmp_path):
    return run(RunConfig(dataset="synthetic", model="resnet8", epochs=2, train_samples=512, test_samples=128,
                         batch_size=32, world_size=2, progress=False, out=str(tmp_path / "spawned")))


def test_torchrun_standalone_runs_the_same_job_as_spawn(tmp_path):
    reference = spawned_reference(tmp_path)
    finish(torchrun("--standalone", "--nproc-per-node", "2", job_args=["--out", str(tmp_path / "tr")]))
    expected = torch.load(reference.run_dir / "model.pt", weights_only=True)
    actual = torch.load(tmp_path / "tr" / "model.pt", weights_only=True)
    assert all(torch.allclose(expected[k].float(), actual[k].float(), atol=1e-6) for k in expected)
    steps = pd.read_csv(tmp_path / "tr" / "steps.csv")
    assert (steps.loss - reference.steps.loss).abs().max() < 1e-5


def test_two_nodes_on_localhost_match_one_node(tmp_path):
    # each "node" would take both cores; one thread per rank keeps the arithmetic that of the one-node run
    reference = spawned_reference(tmp_path)
    port = str(free_port())
    nodes = [torchrun("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr",
                      "127.0.0.1", "--master-port", port, job_args=["--out", str(tmp_path / "two-nodes"), "--threads", "1"])
             for node in (0, 1)]
    for node in nodes:
        finish(node)
    steps = pd.read_csv(tmp_path / "two-nodes" / "steps.csv")
    assert len(steps) == len(reference.steps)
    assert (steps.loss - reference.steps.loss).abs().max() < 1e-5


def test_torchrun_restarts_after_a_sigkill_and_resumes_from_the_last_checkpoint(tmp_path):
    reference = spawned_reference(tmp_path)
    output = finish(torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                             job_args=["--out", str(tmp_path / "elastic"), "--checkpoint-every", "5"],
                             env_extra={"DYNBATCH_TEST_HOOKS": "1", "DYNBATCH_FAULT": "kill:1:21"}))
    assert "resumed from" in output and "step-00000020" in output
    steps = pd.read_csv(tmp_path / "elastic" / "steps.csv")
    # every sample of each epoch used exactly once in the training that counts; no step lost or repeated
    assert steps.groupby("epoch").batch_size.sum().tolist() == [512, 512]
    assert steps.query("rank == 0").step.tolist() == list(range(32))
    epochs = pd.read_csv(tmp_path / "elastic" / "epochs.csv")
    assert epochs.test_acc.iloc[-1] == pytest.approx(reference.epochs.test_acc.iloc[-1], abs=1e-9)
    assert epochs.test_acc.iloc[-1] > 0.2  # 10 classes: chance is 0.1
    expected = torch.load(reference.run_dir / "model.pt", weights_only=True)
    actual = torch.load(tmp_path / "elastic" / "model.pt", weights_only=True)
    assert all(torch.allclose(expected[k].float(), actual[k].float(), atol=1e-6) for k in expected)
