"""Starting ranks: `run(config)` spawns them from Python (CLI, notebooks); `train_under_torchrun` joins torchrun's.

    from dynbatch_core import RunConfig, run
    result = run(RunConfig(dataset="mnist", world_size=2, epochs=2, train_samples=8192))   # RunResult
    run(RunConfig(..., resume="runs/20261125-...-mnist-resnet20"))                          # continue a run

A run either finishes or fails as a whole: when any rank raises or dies, run() stops the others at once and raises
RunFailed naming the rank and its traceback; Ctrl-C (or Jupyter's "interrupt kernel") stops every rank; collectives
give up after --timeout-s. Ranks also die with the launcher, so a killed kernel leaves no orphans: each rank asks
the kernel for SIGKILL when its parent dies (Linux), checks right after that the launcher is still there (closing
the window while it was starting), and a watchdog thread checks again every half second (any platform).

CPU ranks fork from a multiprocessing fork server that has imported torch once (and torch._dynamo, which the first
optimizer imports): a spawned rank spent ~3 s of every run importing those. The server imports nothing of
dynbatch_core, so edits to the package reach the next run, and each rank takes the launcher's environment as of
its run, as a spawned one would. CUDA runs spawn their ranks (the server must never touch CUDA before a fork).

Spawned ranks rendezvous through a store the launcher owns on 127.0.0.1 and talk over the loopback interface only
(distributed.LoopbackStore): nothing of a spawned run listens on the network.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ..config import BatchBounds, RunConfig
from .checkpoint import latest_checkpoint
from .validation import validate_config
from .console import LOG_TO_STDOUT, close_launcher_progress, in_jupyter_kernel, launcher_progress, log
from .distributed import (LoopbackStore, exit_without_teardown, resolve_device, resolve_gradient_sync,
                          threads_per_rank, torchrun_identity)
from ..records import PROGRESS_FILE, ProgressFile, RunResult, read_run, write_json
from ..records import git_commit, prepare_run_dir
from .train import train_worker


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or Jupyter's interrupt) stopped the run, and every rank has ended. IPython shows just the message
    (_render_traceback_), not a traceback through multiprocessing."""

    def __init__(self, ranks_ended: int, run_dir: Path):
        resume = " (its last checkpoint can be resumed)" if _has_checkpoint(str(run_dir)) else ""
        super().__init__(f"run stopped by interrupt; {ranks_ended} rank(s) ended; run folder {run_dir}{resume}")
        self.run_dir = run_dir

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


class RunFailed(RuntimeError):
    """A rank raised or died; the message names it and carries its traceback."""

    def __init__(self, rank: int, message: str, run_dir: Path):
        super().__init__(f"rank {rank} failed (run folder {run_dir}): {message}")
        self.rank = rank
        self.run_dir = run_dir


def run(config: RunConfig) -> RunResult:
    """Validate, create (or reopen, with resume) the run folder, spawn `world_size` ranks, return their tables."""
    data_source = validate_config(config)
    device_kind = resolve_device(config.device, config.world_size)
    run_dir = _open_run_dir(config, device_kind)
    log(f"data: {data_source}")
    log(f"{config.world_size} rank(s) on {_device_line(device_kind, config.device, config.world_size, config.threads)}; "
        f"run folder {run_dir}" + (" (resuming)" if config.resume else ""))
    cap = implied_batch_cap(config)
    if cap is not None:
        log(f"--max-rank-batch {config.max_rank_batch} x {config.world_size} ranks caps the global batch at {cap}")
    store = LoopbackStore(timeout_s=config.timeout_s)  # lives as long as the ranks: they rendezvous through it
    # OpenMP threads spin while waiting by default; on a shared CPU that made steps up to 25x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if in_jupyter_kernel():   # the ranks' log lines then show as output, not as error blocks
        os.environ[LOG_TO_STDOUT] = "1"
    context = mp.start_processes(_spawned_worker, nprocs=config.world_size, join=False,
                                 args=(config, str(run_dir), store.address, device_kind, os.getpid(),
                                       dict(os.environ)),
                                 start_method=_start_method(device_kind))
    bar = _RunProgressBar(config, run_dir)
    interrupted = finished = False
    try:
        while not context.join(timeout=1.0):
            bar.refresh()
        finished = True
    except KeyboardInterrupt:
        interrupted = True
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        raise RunFailed(*_first_failure(context), run_dir) from None
    finally:  # also on KeyboardInterrupt: no rank outlives run()
        _stop(context.processes)
        if not finished:   # nothing of a failed or interrupted run stays behind, the idle fork server included
            _stop_fork_server()
        bar.close()
        del store
    if interrupted:
        raise RunInterrupted(sum(not process.is_alive() for process in context.processes), run_dir)
    return read_run(run_dir)


def train_under_torchrun(config: RunConfig) -> Path:
    """Entry point for a process started by torchrun; every process of the job calls it.

    A run folder that holds a published checkpoint is continued: after torchrun restarts the group
    (--max-restarts), and after a change of membership (--nnodes MIN:MAX), whatever the new number of ranks. A
    node without one may still continue from another node's checkpoint (elastic.newest_checkpoint), so whether to
    resume never depends on TORCHELASTIC_RESTART_COUNT, which a membership change does not bump.
    """
    rank, world_size, local_rank, local_world_size = torchrun_identity()
    config = dataclasses.replace(config, world_size=world_size)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if config.out is None and config.resume is None:
        if run_id in ("", "none"):
            raise ValueError("under torchrun without --standalone or --rdzv-id, pass --out (every node must name "
                             "the same run folder)")
        config = dataclasses.replace(config, out=str(Path("runs") / f"torchrun-{run_id}"))
    folder = config.resume or config.out  # under torchrun --resume X is --out X: what is there is continued
    config = dataclasses.replace(config, out=folder, resume=folder if _has_checkpoint(folder) else None)
    if config.resume is None and _started_by_this_job(folder, run_id):  # died before its first checkpoint
        config = dataclasses.replace(config, overwrite=True)
    data_source = validate_config(config)   # its GPU checks read this node's LOCAL_WORLD_SIZE
    device_kind = resolve_device(config.device, local_world_size)
    run_dir = Path(folder).expanduser().resolve()
    if rank == 0:
        run_dir = _open_run_dir(config, device_kind, torchrun_run_id=run_id)
        log(f"data: {data_source}")
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        log(f"torchrun: {world_size} rank(s) on {_device_line(device_kind, config.device, local_world_size, config.threads)}; "
            f"run folder {run_dir}" + (f" (restart {restarts})" if restarts != "0" else ""))
    train_worker(config, rank=rank, local_rank=local_rank, local_world_size=local_world_size, run_dir=run_dir,
                 init_method="env://", device_kind=device_kind, draw_progress=True)
    return run_dir


def _has_checkpoint(run_dir: str) -> bool:
    return Path(run_dir).is_dir() and latest_checkpoint(Path(run_dir)) is not None


def _started_by_this_job(run_dir: str, run_id: str) -> bool:
    """The folder's config.json was written by this torchrun job (same rendezvous id): its own earlier round."""
    try:
        resolved = json.loads((Path(run_dir) / "config.json").read_text()).get("resolved", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return run_id not in ("", "none") and resolved.get("torchrun_run_id") == run_id


# What every rank imports before its first step: preloaded once by the fork server (see the module docstring).
_FORK_SERVER_PRELOAD = ["torch", "torch._dynamo"]


def _start_method(device_kind: str) -> str:
    if device_kind != "cpu" or "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.set_forkserver_preload(_FORK_SERVER_PRELOAD)   # takes effect when the server starts, with the first run
    return "forkserver"


def _stop_fork_server() -> None:
    from multiprocessing import forkserver
    stop = getattr(forkserver._forkserver, "_stop", None)   # CPython's own way (private); without it, it idles on
    if stop is not None:
        stop()


def _spawned_worker(rank: int, config: RunConfig, run_dir: str, init_method: str, device_kind: str,
                    launcher_pid: int, environment: dict[str, str]) -> None:
    _die_with_parent(launcher_pid)
    if os.environ != environment:   # a forked rank holds the fork server's environment, from its start
        os.environ.clear()
        os.environ.update(environment)
    # A forked rank's own default start method would be forkserver: its DataLoader workers would then come from a
    # server of its own and outlive a killed rank (they watch that server). Spawn them, as a spawned rank does.
    mp.set_start_method("spawn", force=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops every rank
    train_worker(config, rank=rank, local_rank=rank, local_world_size=config.world_size, run_dir=Path(run_dir),
                 init_method=init_method, device_kind=device_kind, draw_progress=False)
    exit_without_teardown(0)  # an exception instead propagates: torch.multiprocessing reports its traceback


def _die_with_parent(launcher_pid: int, every_s: float = 0.5) -> None:
    """Never outlive the launcher (a killed notebook kernel must not leave ranks behind).

    Linux sends SIGKILL when the parent dies, but only from the moment it is asked; the launcher may have died while
    this process was still importing, so check the parent right after asking, and keep checking from a watchdog
    thread (which also covers platforms without the death signal).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    parent = os.getppid()   # the launcher (spawn) or the fork server, which exits with the launcher

    def orphaned() -> bool:
        return os.getppid() != parent or not _process_exists(launcher_pid)

    if orphaned():
        os._exit(1)

    def watch() -> None:
        while not orphaned():
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="dynbatch-parent-watchdog", daemon=True).start()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # it exists, under another user
        pass
    return True


class _RunProgressBar:
    """The launcher's progress bar (a widget in Jupyter, text in a terminal), fed by rank 0's progress.json."""

    def __init__(self, config: RunConfig, run_dir: Path):
        self.source = ProgressFile(run_dir / PROGRESS_FILE)
        self.epochs = "" if config.lr_scaling == "adascale" else f"/{config.epochs}"   # AdaScale: its budget ends it
        self.bar = launcher_progress(total=config.max_steps, enabled=config.progress)

    def refresh(self) -> None:
        progress = self.source.read()
        if progress is None or "total_steps" not in progress or self.bar.disable:
            return
        self.bar.set_description(f"epoch {progress['epoch'] + 1}{self.epochs} B={progress['global_batch']}",
                                 refresh=False)
        self.bar.set_postfix(loss=f"{progress['loss']:.3f}", split=",".join(map(str, progress["split"])),
                             refresh=False)
        self.bar.total = progress["total_steps"]  # re-estimated as the schedule changes the batch
        self.bar.update(progress["step"] - self.bar.n)

    def close(self) -> None:
        self.refresh()
        close_launcher_progress(self.bar)


def _stop(processes, grace_s: float = 5.0) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()


def _first_failure(context) -> tuple[int, str]:
    """(rank, how) of the failure that ended the run. When one rank fails, its peers fail in their next collective
    and torch reports whichever exit it noticed first; the cause is a rank killed by a signal (other than the SIGTERM
    that stopped the rest), else the earliest traceback a rank wrote, else a rank's non-zero exit code."""
    codes = [process.exitcode for process in context.processes]
    killed = [rank for rank, code in enumerate(codes) if code is not None and code < 0 and code != -signal.SIGTERM]
    written = sorted((os.stat(path).st_mtime_ns, rank, path) for rank, path in enumerate(context.error_files)
                     if os.path.exists(path))
    if written and not killed:
        _, rank, path = written[0]
        with open(path, "rb") as handle:
            text = pickle.load(handle).strip()   # the rank's formatted traceback (torch.multiprocessing writes it)
        return rank, f"{text.splitlines()[-1] if text else 'unknown error'}\n{text}"
    rank = killed[0] if killed else next((rank for rank, code in enumerate(codes) if code), 0)
    code = codes[rank]
    return rank, (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                  else f"exited with code {code}")


def _open_run_dir(config: RunConfig, device_kind: str, torchrun_run_id: str | None = None) -> Path:
    if config.resume is not None:
        return Path(config.resume).expanduser().resolve()
    run_dir = prepare_run_dir(config.out, overwrite=config.overwrite, label=_run_label(config))
    write_json(run_dir / "config.json", {**config.to_dict(), "resolved": {
        "balancer": config.balancer_name, "device": device_kind,
        "gradient_sync": resolve_gradient_sync(config.gradient_sync, device_kind), "git_commit": git_commit(),
        **({"torchrun_run_id": torchrun_run_id} if torchrun_run_id else {})}})
    return run_dir


def implied_batch_cap(config: RunConfig) -> int | None:
    """world_size x --max-rank-batch when it, not --max-batch, bounds a schedule that can grow the global batch."""
    bounds = BatchBounds.of(config)
    if not bounds.implied_by_rank_cap or config.schedule in ("static", "decreasing"):
        return None
    return bounds.max_batch


def _run_label(config: RunConfig) -> str:
    return f"{config.dataset}-{config.model}-ws{config.world_size}-{config.schedule}-{config.balancer_name}"


def _device_line(device_kind: str, asked: str, ranks_here: int, threads: int | None) -> str:
    if device_kind == "cuda":
        return "CUDA (NCCL, one GPU per rank)"
    reason = " (fewer GPUs visible than ranks)" if asked == "auto" and torch.cuda.is_available() else ""
    return f"CPU (gloo){reason}, {threads or threads_per_rank(ranks_here)} thread(s) per rank"
