"""A spawned run listens on loopback only, and its rendezvous port cannot be taken between choosing and binding it."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from conftest import rank_processes
from dynbatch_core import RunConfig, run
from dynbatch_core.engine.distributed import LoopbackStore

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1"}


def family_tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def listeners(pid: int) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of `pid` and its descendants."""
    found = []
    for process in family_tree(pid):
        try:
            for connection in process.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    found.append((process.pid, connection.laddr.ip, connection.laddr.port))
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for_training(run_dir: Path, timeout_s: float = 120) -> None:
    """Until rank 0 reported its first step: every rank has joined the group and opened its listeners."""
    deadline = time.monotonic() + timeout_s
    while not (run_dir / "progress.json").exists():
        assert time.monotonic() < deadline, "the run never started training"
        time.sleep(0.1)


def long_config(tmp_path, name, **overrides):
    values = dict(dataset="synthetic", model="resnet8", world_size=2, epochs=200, train_samples=512, test_samples=64,
                  initial_batch=32, progress=False, out=str(tmp_path / name))
    return RunConfig(**{**values, **overrides})


def test_every_listener_of_a_two_rank_cli_run_is_on_loopback(tmp_path):
    command = [sys.executable, "-m", "dynbatch_core", "train", "--dataset", "synthetic", "--model", "resnet8",
               "--epochs", "200", "--train-samples", "512", "--no-progress", "--out", str(tmp_path / "cli")]
    cli = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(tmp_path / "cli")
        found = listeners(cli.pid)
        ranks = rank_processes(cli.pid)
        assert len(ranks) == 2
    finally:
        cli.send_signal(signal.SIGINT)
        cli.communicate(timeout=60)
    assert [entry for entry in found if entry[1] not in LOOPBACK] == []
    listening_pids = {pid for pid, _, _ in found}
    assert cli.pid in listening_pids                           # the rendezvous store lives in the launcher
    assert {rank.pid for rank in ranks} <= listening_pids      # gloo's listeners, one set per rank


def test_a_spawned_rank_pins_gloo_and_nccl_to_the_loopback_interface(monkeypatch):
    """Whatever the hostname resolves to (here it resolves to 127.0.0.1, so the listener test alone cannot tell)."""
    from dynbatch_core.engine.distributed import init_process_group
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.setenv(variable, "unset")  # so that monkeypatch restores the environment afterwards
        monkeypatch.delenv(variable)
    store = LoopbackStore(timeout_s=30)
    init_process_group("cpu", 0, 1, store.address, timeout_s=30)
    try:
        assert (os.environ.get("GLOO_SOCKET_IFNAME"), os.environ.get("NCCL_SOCKET_IFNAME")) == ("lo", "lo")
        found = listeners(os.getpid())
        assert (os.getpid(), "127.0.0.1", store.port) in found and len(found) >= 2   # the store and gloo's
        assert {address for _, address, _ in found} == {"127.0.0.1"}
    finally:
        dist.destroy_process_group()


def test_the_listener_check_catches_a_store_on_every_interface(tmp_path, monkeypatch):
    """The check above can fail: a store bound to 0.0.0.0 (what TCPStore does given "127.0.0.1") is reported."""
    monkeypatch.setattr("dynbatch_core.engine.distributed.LOOPBACK_HOST", "0.0.0.0")
    config = long_config(tmp_path, "wildcard", epochs=6)
    worker = threading.Thread(target=run, args=(config,), daemon=True)
    worker.start()
    wait_for_training(tmp_path / "wildcard")
    found = listeners(os.getpid())
    worker.join(120)
    assert not worker.is_alive()
    wildcard = [entry for entry in found if entry[1] not in LOOPBACK]
    assert [(pid, address) for pid, address, _ in wildcard] == [(os.getpid(), "0.0.0.0")]


def test_the_store_gets_a_socket_already_listening_so_no_other_process_can_take_its_port(monkeypatch):
    """Choosing a free port, closing the probe and letting the store bind it later leaves a gap in which another
    process can take the port (that broke runs). The launcher binds port 0 itself: the store must be handed that
    descriptor, already bound to 127.0.0.1 and listening on the port it is told."""
    seen, real_store = {}, dist.TCPStore

    def recording_store(host, port, *args, **kwargs):
        descriptor = kwargs.get("master_listen_fd")
        if descriptor is not None:
            with socket.socket(fileno=os.dup(descriptor)) as probe:
                seen["listening"] = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                seen["bound"] = probe.getsockname()
        seen["told"] = (host, port)
        return real_store(host, port, *args, **kwargs)
    monkeypatch.setattr(dist, "TCPStore", recording_store)
    store = LoopbackStore(timeout_s=5)
    assert seen.get("listening") == 1, seen
    assert seen["bound"] == seen["told"] == ("127.0.0.1", store.port)
