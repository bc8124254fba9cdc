"""The same worker under torchrun: one node, two "nodes" on localhost, restarts, and nodes leaving and joining."""
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

import pandas as pd
import pytest
import torch

from dynbatch_core import RunConfig, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
JOB = ["--dataset", "synthetic", "--model", "resnet8", "--epochs", "2", "--train-samples", "512",
       "--test-samples", "128", "--batch-size", "32", "--no-progress"]


def torchrun(*launcher_args, job_args=(), env_extra=None, new_session=False):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "dynbatch_core",
                             "train", *JOB, *job_args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=new_session)


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
                         initial_batch=32, world_size=2, progress=False, out=str(tmp_path / "spawned")))


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
    assert steps.groupby("epoch").rank_batch.sum().tolist() == [512, 512]
    assert steps.query("rank == 0").step.tolist() == list(range(32))
    epochs = pd.read_csv(tmp_path / "elastic" / "epochs.csv")
    assert epochs.test_acc.iloc[-1] == pytest.approx(reference.epochs.test_acc.iloc[-1], abs=1e-9)
    assert epochs.test_acc.iloc[-1] > 0.2  # 10 classes: chance is 0.1
    expected = torch.load(reference.run_dir / "model.pt", weights_only=True)
    actual = torch.load(tmp_path / "elastic" / "model.pt", weights_only=True)
    assert all(torch.allclose(expected[k].float(), actual[k].float(), atol=1e-6) for k in expected)


# --- elastic membership ---------------------------------------------------------------------------------------------
ELASTIC_JOB = ["--norm", "none", "--epochs", "3", "--train-samples", "1024", "--threads", "1", "--checkpoint-every", "4",
               "--emulated-sample-ms", "3", "--timeout-s", "30"]
# torch 2.14.1: with the agents' shared TCP store, a node that joins a running job waits forever for a store address
# the rank-0 agent never publishes again; a store per round avoids it (README: elastic runs).
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class Agent:
    """One torchrun agent (an elastic "node") in a session of its own, its output collected line by line."""

    def __init__(self, port, out, env_extra=None):
        self.process = torchrun("--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "3", "--rdzv-backend",
                                "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "elastic",
                                "--rdzv-conf", "last_call_timeout=1", "--monitor-interval", "0.2",
                                job_args=[*ELASTIC_JOB, "--out", str(out)], env_extra={**ELASTIC_ENV, **(env_extra or {})},
                                new_session=True)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def wait_for(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline and self.process.poll() is None, f"no {text!r}:\n{''.join(self.lines)}"
            time.sleep(0.2)

    def kill_node(self):
        """SIGKILL the agent and its workers: torchrun starts each worker in a session of its own, so a killed agent
        alone would leave its workers running."""
        tree = [self.process.pid] + [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def steps_done(run_dir):
    try:
        return json.loads((run_dir / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_until(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_an_elastic_job_goes_on_after_a_node_leaves_and_after_one_joins(tmp_path):
    out = tmp_path / "elastic"
    port = free_port()
    first = Agent(port, out)   # hosts the rendezvous store: it must stay
    time.sleep(1)
    second = Agent(port, out)
    wait_until(lambda: steps_done(out) >= 10)   # past the checkpoint at step 8 (both nodes write into one folder)
    second.kill_node()
    first.wait_for("written by 2 ranks, now 1")
    resumed_alone = steps_done(out)
    wait_until(lambda: steps_done(out) >= resumed_alone + 6)
    third = Agent(port, out)
    first.wait_for("written by 1 ranks, now 2")
    for agent in (first, third):
        assert agent.process.wait(timeout=180) == 0, "".join(agent.lines)

    steps = pd.read_csv(out / "steps.csv")
    # the training that counts: 96 steps of B = 32, every sample once per epoch, on 2, then 1, then 2 ranks
    assert sorted(steps.step.unique()) == list(range(96))
    assert steps.groupby("step").rank_batch.sum().eq(32).all()
    assert steps.groupby("epoch").rank_batch.sum().tolist() == [1024] * 3
    sizes = steps.groupby("step").world_size.first()
    changes = [int(size) for size, _ in itertools.groupby(sizes)]
    assert changes == [2, 1, 2], changes
    # norm none and fixed B: the math is that of one uninterrupted run, whatever the number of ranks
    reference = run(RunConfig(dataset="synthetic", model="resnet8", norm="none", epochs=3, train_samples=1024,
                              test_samples=128, initial_batch=32, world_size=2, progress=False, out=str(tmp_path / "ref")))
    expected = torch.load(reference.run_dir / "model.pt", weights_only=True)
    actual = torch.load(out / "model.pt", weights_only=True)
    assert max((expected[key] - actual[key]).abs().max().item() for key in expected) < 1e-5


def test_nodes_with_run_folders_of_their_own_resume_from_the_node_that_holds_the_checkpoint(tmp_path):
    reference = spawned_reference(tmp_path)
    port = str(free_port())
    folders = [tmp_path / "node0", tmp_path / "node1"]
    nodes = [torchrun("--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                      "--master-port", port, "--max-restarts", "1",
                      job_args=["--out", str(folders[node]), "--threads", "1", "--checkpoint-every", "5",
                                "--emulated-sample-ms", "1"],
                      env_extra={"DYNBATCH_TEST_HOOKS": "1", "DYNBATCH_FAULT": "kill:1:21",
                                 **({"DYNBATCH_NODE_SLOWDOWN": "3"} if node == 1 else {})})
             for node in (0, 1)]
    outputs = [finish(node) for node in nodes]
    assert "resumed from" in outputs[0] and "step-00000020" in outputs[0]
    assert not (folders[1] / "checkpoints").exists()   # only rank 0 writes: node 1 never held a checkpoint
    steps = pd.read_csv(folders[0] / "steps.csv")
    assert steps.groupby("epoch").rank_batch.sum().tolist() == [512, 512]
    assert (steps.loss - reference.steps.loss).abs().max() < 1e-5
    # DYNBATCH_NODE_SLOWDOWN=3 on node 1: its rank computes about 3x longer on the same slice
    ratio = (steps.query("rank == 1").compute_s.median() / steps.query("rank == 0").compute_s.median())
    assert 2 < ratio < 4
