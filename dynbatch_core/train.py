"""Training: `run(config)` spawns one process per rank; each runs `train_worker`, the epoch loop.

    from dynbatch_core import RunConfig, run
    result = run(RunConfig(dataset="mnist", model="resnet20", world_size=2, epochs=2, train_samples=8192))
    result.epochs[["epoch", "global_batch", "test_acc", "wall_s"]]

Under torchrun (`torchrun --nproc-per-node 2 -m dynbatch_core train ...`) the CLI calls `train_under_torchrun`,
which runs the same `train_worker` with the env:// rendezvous.

Each step: the schedule's global batch B (decided at epoch boundaries), the balancer's split of B over ranks, the
sampler's slice of the epoch's global order for this rank, then step.train_step (exact on uneven slices). Only rank 0
writes files; the tables are gathered to it at the end of every epoch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from .balancers import build_balancer
from .config import RunConfig, balancer_options, schedule_options, validate_config
from .console import log, progress_bar
from .data import collate_batch, load_datasets
from .distributed import (init_process_group, launched_by_torchrun, resolve_device, threads_per_rank,
                          torchrun_identity, free_port)
from .hetero import SlowdownPlan
from .metrics import EPOCH_COLUMNS, STEP_COLUMNS, RunResult, read_run, write_atomic, write_json, write_table
from .models import build_model
from .rundir import git_commit, prepare_run_dir
from .sampler import DynamicBatchSampler
from .lr import decay_factor, scaled_lr, warmup_lr
from .schedules import EpochSummary, build_schedule
from .step import GradientSync, train_step


def run(config: RunConfig) -> RunResult:
    """Validate, create the run folder, spawn `world_size` ranks, and return their metrics tables."""
    data_source = validate_config(config)
    device_kind = resolve_device(config.device, config.world_size)
    run_dir = prepare_run_dir(config.out, overwrite=config.overwrite, label=_run_label(config))
    log(f"data: {data_source}")
    log(f"{config.world_size} rank(s) on {_device_line(device_kind, config.device, config.world_size)}; "
        f"run folder {run_dir}")
    _write_config(run_dir, config, device_kind)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(_spawned_worker, args=(config, str(run_dir), init_method, device_kind), nprocs=config.world_size,
             join=True)
    return read_run(run_dir)


def train_under_torchrun(config: RunConfig) -> Path:
    """Entry point for a process started by torchrun; every process of the job calls it."""
    rank, world_size, local_rank, local_world_size = torchrun_identity()
    config = dataclasses.replace(config, world_size=world_size)
    data_source = validate_config(config)
    device_kind = resolve_device(config.device, local_world_size)
    out = config.out or str(Path("runs") / f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}")
    run_dir = Path(out).expanduser().resolve()
    if rank == 0:
        run_dir = prepare_run_dir(out, overwrite=config.overwrite, label=_run_label(config))
        log(f"data: {data_source}")
        log(f"torchrun: {world_size} rank(s) on {_device_line(device_kind, config.device, local_world_size)}; "
            f"run folder {run_dir}")
        _write_config(run_dir, config, device_kind)
    train_worker(config, rank=rank, local_rank=local_rank, local_world_size=local_world_size, run_dir=run_dir,
                 init_method="env://", device_kind=device_kind)
    return run_dir


def _spawned_worker(rank: int, config: RunConfig, run_dir: str, init_method: str, device_kind: str) -> None:
    train_worker(config, rank=rank, local_rank=rank, local_world_size=config.world_size, run_dir=Path(run_dir),
                 init_method=init_method, device_kind=device_kind)


def train_worker(config: RunConfig, *, rank: int, local_rank: int, local_world_size: int, run_dir: Path,
                 init_method: str, device_kind: str) -> None:
    torch.set_num_threads(threads_per_rank(local_world_size))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    init_process_group(device_kind, rank, config.world_size, init_method, config.timeout_s)
    try:
        device = torch.device("cuda", local_rank) if device_kind == "cuda" else torch.device("cpu")
        _train(config, rank=rank, device=device, run_dir=run_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train(config: RunConfig, *, rank: int, device: torch.device, run_dir: Path) -> None:
    world_size = config.world_size
    train_set, test_set, _ = load_datasets(config.dataset, data_dir=config.data_dir, download=config.download,
                                           train_samples=config.train_samples, test_samples=config.test_samples,
                                           augment=config.augment, seed=config.seed)
    torch.manual_seed(config.seed)
    spec = train_set.spec
    model = build_model(config.model, in_channels=spec.in_channels, num_classes=spec.num_classes, norm=config.norm)
    if config.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)  # identical start on every rank, whatever the RNG did
    optimizer = _build_optimizer(config, model)
    schedule = build_schedule(config.schedule, **schedule_options(config))
    balancer = build_balancer(config.balancer_name, world_size, **balancer_options(config))
    slowdown = SlowdownPlan.from_options(world_size, slowdown=config.slowdown, trace=config.slowdown_trace)
    sampler = DynamicBatchSampler(len(train_set), rank=rank, world_size=world_size, seed=config.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_batch)
    sync = GradientSync(model.parameters(), world_size=world_size)

    history: list[EpochSummary] = []
    step_rows: list[dict] = []
    epoch_rows: list[dict] = []
    global_step = 0
    samples_seen = 0
    total_samples = config.epochs * len(train_set)
    training_s = 0.0
    lr = previous_lr = config.lr
    for epoch in range(config.epochs):
        decision = schedule.decide(epoch, history)
        target_lr = scaled_lr(config.lr, decision.global_batch, config.batch_size, config.lr_scaling) \
            * decision.lr_factor
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        bar = progress_bar(total=math.ceil(len(train_set) / decision.global_batch),
                           description=f"epoch {epoch + 1}/{config.epochs} B={decision.global_batch}",
                           enabled=config.progress and rank == 0)
        epoch_started = time.perf_counter()
        epoch_loss_sum, epoch_samples, epoch_steps = 0.0, 0, 0
        my_rows = []
        batches = iter(loader)
        while config.max_steps is None or global_step < config.max_steps:
            sampler.set_rank_batches(balancer.split(decision.global_batch))
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            step_batches = sampler.last_rank_batches
            lr = warmup_lr(previous_lr, target_lr, epoch_steps, config.warmup_steps) \
                * decay_factor(config.lr_decay, samples_seen, total_samples)
            for group in optimizer.param_groups:
                group["lr"] = lr
            result = train_step(model, optimizer, images.to(device, non_blocking=True),
                                labels.to(device, non_blocking=True), global_batch=sum(step_batches), rank=rank,
                                sync=sync, slowdown=slowdown.factor(rank, global_step))
            balancer.observe(result.compute_s, result.rank_batches)
            my_rows.append({"epoch": epoch, "step": global_step, "rank": rank,
                            "batch_size": result.rank_batches[rank], "global_batch": result.global_batch,
                            "compute_s": result.compute_s[rank], "wait_s": result.wait_s,
                            "loss": result.loss_sums[rank] / max(1, result.rank_batches[rank]), "lr": lr})
            epoch_loss_sum += sum(result.loss_sums)
            epoch_samples += result.global_batch
            samples_seen += result.global_batch
            epoch_steps += 1
            global_step += 1
            bar.set_postfix(loss=f"{result.loss:.3f}", split=",".join(map(str, result.rank_batches)), refresh=False)
            bar.update()
        bar.close()
        epoch_s = time.perf_counter() - epoch_started
        previous_lr = target_lr  # warm-up ramps between undecayed targets
        training_s += epoch_s
        balancer.end_epoch()
        test_loss, test_acc = evaluate(model, test_set, rank=rank, world_size=world_size, device=device)
        train_loss = epoch_loss_sum / max(1, epoch_samples)
        history.append(EpochSummary(epoch, decision.global_batch, train_loss, epoch_s))
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(my_rows, gathered, dst=0)
        if rank == 0:
            step_rows.extend(sorted((row for rows in gathered for row in rows), key=lambda r: (r["step"], r["rank"])))
            epoch_rows.append({"epoch": epoch, "global_batch": decision.global_batch, "steps": epoch_steps,
                               "samples": epoch_samples, "train_loss": train_loss, "test_loss": test_loss,
                               "test_acc": test_acc, "epoch_s": epoch_s, "wall_s": training_s,
                               "samples_per_s": epoch_samples / epoch_s if epoch_s > 0 else float("nan")})
            write_table(run_dir / "steps.csv", step_rows, STEP_COLUMNS)
            write_table(run_dir / "epochs.csv", epoch_rows, EPOCH_COLUMNS)
            log(f"epoch {epoch + 1}/{config.epochs}: B={decision.global_batch} steps={epoch_steps} "
                f"train_loss={train_loss:.4f} test_loss={test_loss:.4f} test_acc={test_acc:.4f} "
                f"{epoch_samples / epoch_s:.0f} samples/s")
        if config.max_steps is not None and global_step >= config.max_steps:
            break
    if rank == 0:
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        write_atomic(run_dir / "model.pt", lambda tmp: torch.save(state, tmp))


@torch.no_grad()
def evaluate(model: torch.nn.Module, test_set, *, rank: int, world_size: int, device: torch.device,
             batch_size: int = 500) -> tuple[float, float]:
    """Mean test loss and accuracy; each rank scores a contiguous shard, the sums are all-reduced."""
    if world_size > 1:  # ranks' batch-norm statistics saw different slices: evaluate with their mean
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= world_size
    model.eval()
    start, stop = rank * len(test_set) // world_size, (rank + 1) * len(test_set) // world_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for first in range(start, stop, batch_size):
        images, labels = test_set.__getitems__(list(range(first, min(first + batch_size, stop))))
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        sums[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) == labels).sum().double()
        sums[2] += len(labels)
    dist.all_reduce(sums)
    model.train()
    loss_sum, correct, count = sums.tolist()
    return loss_sum / count, correct / count


def _build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _run_label(config: RunConfig) -> str:
    return f"{config.dataset}-{config.model}-ws{config.world_size}-{config.schedule}-{config.balancer_name}"


def _device_line(device_kind: str, asked: str, ranks_here: int) -> str:
    if device_kind == "cuda":
        return f"CUDA (NCCL, one GPU per rank)"
    reason = " (fewer GPUs visible than ranks)" if asked == "auto" and torch.cuda.is_available() else ""
    return f"CPU (gloo){reason}, {threads_per_rank(ranks_here)} thread(s) per rank"


def _write_config(run_dir: Path, config: RunConfig, device_kind: str) -> None:
    write_json(run_dir / "config.json", {**config.to_dict(), "resolved": {
        "balancer": config.balancer_name, "device": device_kind, "git_commit": git_commit()}})
