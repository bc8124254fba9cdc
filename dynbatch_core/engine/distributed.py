"""Process-group plumbing: which device, which backend, the rendezvous store, and who am I under torchrun.

    check_device("auto", world_size=2)          # ValueError if "cuda" is asked for without enough GPUs
    device_kind = resolve_device("auto", 2)     # "cuda" when >= 2 GPUs are visible, else "cpu"
    store = LoopbackStore()                     # launcher: the rendezvous store, listening on 127.0.0.1 only
    init_process_group("cpu", rank, world_size, store.address, timeout_s=300)   # in each spawned rank

Spawned runs never listen beyond this machine. torch's TCPStore binds every interface even when given
"127.0.0.1", and the store is unauthenticated; so the launcher binds a loopback socket itself (port 0: the port is
never free between choosing and binding it) and hands the listening descriptor to the store. Each rank pins gloo
(and NCCL's bootstrap) to the loopback interface, whatever this machine's hostname resolves to. torchrun runs keep
torchrun's own rendezvous: multi-node needs the network, so they belong on a trusted network.
"""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
import time
import uuid

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str, world_size: int, *, sync_bn: bool = False) -> None:
    """Refuse device settings that cannot work, before anything is spawned. world_size: the ranks on this machine
    (under torchrun its LOCAL_WORLD_SIZE: each node brings its own GPUs)."""
    gpus = visible_gpus()
    if device == "cuda" and gpus < world_size:
        raise ValueError(f"--device cuda needs one GPU per rank: {world_size} ranks but {gpus} GPU(s) visible; "
                         "use --device auto or cpu, or fewer ranks")
    if sync_bn and resolve_device(device, world_size) != "cuda":
        raise ValueError("--sync-bn needs CUDA (torch's SyncBatchNorm does not run on CPU)")


def resolve_device(device: str, world_size: int) -> str:
    """"cuda" (NCCL, one GPU per rank) or "cpu" (gloo)."""
    if device == "auto":
        return "cuda" if visible_gpus() >= world_size else "cpu"
    return device


GRADIENT_SYNCS = ("auto", "ddp", "explicit", "fsdp")


def resolve_gradient_sync(choice: str, device: torch.device | str) -> str:
    """"ddp" (stock DistributedDataParallel, gradient all-reduce overlapped with backward), "explicit" (one
    bucketed all-reduce after backward, step.GradientSync) or "fsdp" (FSDP2, fully_shard per residual block, summing
    reduce-scatters: fsdp.py). auto: ddp on CUDA, where overlap pays; explicit on CPU, where overlap cannot show and
    the explicit path measured 1.5-6 % faster (benchmarks/overhead.py)."""
    if choice == "auto":
        return "ddp" if torch.device(device).type == "cuda" else "explicit"
    return choice


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_rank(local_world_size: int) -> int:
    """Ranks on one machine share its cores: cores // ranks, at least 1."""
    return max(1, cpu_cores() // max(1, local_world_size))


LOOPBACK_HOST = "127.0.0.1"
LOOPBACK_PREFIX = "tcp://127.0.0.1:"   # the address the launcher hands to spawned ranks


class LoopbackStore:
    """The launcher's rendezvous store for spawned ranks: a TCPStore on a socket bound to 127.0.0.1, port 0."""

    def __init__(self, timeout_s: float = 300.0):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((LOOPBACK_HOST, 0))
            listener.listen(128)
            self.port = listener.getsockname()[1]
        except BaseException:
            listener.close()
            raise
        # The store owns the descriptor from here on (it closes it).
        self.store = dist.TCPStore(LOOPBACK_HOST, self.port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                                   wait_for_workers=False, master_listen_fd=listener.detach())

    @property
    def address(self) -> str:
        return f"{LOOPBACK_PREFIX}{self.port}"


def loopback_interface() -> str:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    candidates = [name for name in names if name.startswith("lo")]
    if not candidates:
        raise RuntimeError(f"no loopback network interface found among {names}")
    return candidates[0]


def pin_to_loopback() -> None:
    """Make gloo and NCCL's bootstrap listen on the loopback interface only (a spawned, single-machine run)."""
    interface = loopback_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    os.environ["NCCL_SOCKET_IFNAME"] = interface


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


def torchrun_identity() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's environment."""
    env = os.environ
    world_size = int(env["WORLD_SIZE"])
    return (int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", world_size)))


def init_process_group(device_kind: str, rank: int, world_size: int, init_method: str, timeout_s: float) -> None:
    """Join the group: a spawned rank joins the launcher's LoopbackStore (init_method "tcp://127.0.0.1:PORT"),
    a torchrun rank joins torchrun's store (init_method "env://")."""
    backend = "nccl" if device_kind == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # Bound to this rank's GPU (torch.cuda.set_device first): NCCL's barrier otherwise guesses it, with a warning.
    bound = {"device_id": torch.device("cuda", torch.cuda.current_device())} if device_kind == "cuda" else {}
    if init_method.startswith(LOOPBACK_PREFIX):
        pin_to_loopback()
        store = dist.TCPStore(LOOPBACK_HOST, int(init_method[len(LOOPBACK_PREFIX):]), None, False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **bound)
        return
    if init_method != "env://":
        raise ValueError(f"unsupported init_method {init_method!r}: expected env:// or {LOOPBACK_PREFIX}PORT")
    # Under torchrun the rendezvous store outlives a restart of the group; without a namespace of this round the
    # new ranks would read the dead ranks' addresses and fail to connect.
    store, _, _ = next(rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    global _job_store
    _job_store = store
    round_id = agree_on_round(store, rank, world_size, timeout_s=timeout_s)
    dist.init_process_group(backend, store=dist.PrefixStore(f"dynbatch/round-{round_id}", store), rank=rank,
                            world_size=world_size, timeout=timeout, **bound)


_job_store: dist.Store | None = None


def job_store() -> dist.Store | None:
    """torchrun's rendezvous store, which outlives the job's rounds (None for a spawned run)."""
    return _job_store


def agree_on_round(store: dist.Store, rank: int, world_size: int, *, timeout_s: float, poll_s: float = 0.02) -> str:
    """A name that every rank of this rendezvous round shares and no earlier round used.

    torchrun's TORCHELASTIC_RESTART_COUNT is no such name: a change of membership does not bump it, and a node that
    joins later starts at 0. So rank 0 makes up a fresh name and hands it to every other rank, which first says
    hello with a fresh token of its own: keys an earlier round left in the store (a hello never answered, a reply
    never read) carry tokens nobody waits for any more, so they cannot be mistaken for this round's.
    """
    deadline = time.monotonic() + timeout_s
    if rank != 0:
        hello, said = uuid.uuid4().hex, 0.0
        while True:
            if time.monotonic() - said > 0.5:  # again now and then: rank 0 may have deleted it as an old one
                store.set(f"dynbatch/hello/{rank}", hello)
                said = time.monotonic()
            if store.check([f"dynbatch/reply/{rank}"]):
                token, _, round_id = store.get(f"dynbatch/reply/{rank}").decode().partition(":")
                if token == hello:
                    store.set(f"dynbatch/ack/{rank}", round_id)
                    return round_id
            _wait_or_fail(deadline, poll_s, f"rank {rank} heard no round name from rank 0")
    round_id, waiting = uuid.uuid4().hex, set(range(1, world_size))
    while waiting:
        for other in sorted(waiting):
            if store.check([f"dynbatch/hello/{other}"]):
                hello = store.get(f"dynbatch/hello/{other}").decode()
                store.delete_key(f"dynbatch/hello/{other}")
                store.set(f"dynbatch/reply/{other}", f"{hello}:{round_id}")
            if store.check([f"dynbatch/ack/{other}"]) and store.get(f"dynbatch/ack/{other}").decode() == round_id:
                waiting.discard(other)
        if waiting:
            _wait_or_fail(deadline, poll_s, f"rank 0 heard no hello from rank(s) {sorted(waiting)}")
    return round_id


def _wait_or_fail(deadline: float, poll_s: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise RuntimeError(f"{what} within the timeout: a rank of this rendezvous round did not start")
    time.sleep(poll_s)


def exit_without_teardown(code: int = 0) -> None:
    """End a rank's process now: run the atexit handlers, flush, then os._exit, skipping the interpreter's
    teardown of C++ objects.

    With torch 2.14.1, about one gloo rank process in ten aborted *after* destroy_process_group, while Python
    finalised ("terminate called without an active exception", SIGABRT), turning finished runs into failures;
    with os._exit none did in the same loop (measured on tests/test_collectives.py: 3/20 vs 0/12). Call it only
    when everything the process writes has been written.
    """
    atexit._run_exitfuncs()  # Python's own exit handlers still run (multiprocessing releases its semaphores)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
