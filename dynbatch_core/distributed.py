"""Process-group plumbing: which device, which backend, which port, and who am I under torchrun.

    check_device("auto", world_size=2)          # ValueError if "cuda" is asked for without enough GPUs
    device_kind = resolve_device("auto", 2)     # "cuda" when >= 2 GPUs are visible, else "cpu"
    address = f"tcp://127.0.0.1:{free_port()}"
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str, world_size: int, *, sync_bn: bool = False) -> None:
    """Refuse device settings that cannot work, before anything is spawned."""
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


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_rank(local_world_size: int) -> int:
    """Ranks on one machine share its cores: cores // ranks, at least 1."""
    return max(1, cpu_cores() // max(1, local_world_size))


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    backend = "nccl" if device_kind == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if init_method != "env://":
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        return
    # Under torchrun the rendezvous store outlives a restart of the group; without a per-attempt namespace the
    # new ranks would read the dead ranks' addresses and fail to connect.
    store, _, _ = next(rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"dynbatch/attempt-{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timeout)
