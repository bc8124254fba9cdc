"""Checking a RunConfig before anything is spawned: one ValueError line saying what is wrong and what is allowed,
and what a resumed run may change.

    data_source = validate_config(config)     # run() and the CLI both call it
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from ..batching.balancers import BALANCERS, build_balancer
from .checkpoint import latest_checkpoint
from ..config import BatchBounds, RunConfig, balancer_options, flag, schedule_options, stored_config
from ..data import DATASET_NAMES, describe_data_source
from .distributed import GRADIENT_SYNCS, check_device, launched_by_torchrun, resolve_device, torchrun_identity
from .emulation import SlowdownPlan
from ..batching.lr import LR_DECAYS, LR_SCALINGS
from ..models import MODEL_NAMES, NORM_CHOICES
from ..batching.schedules import SCHEDULES, build_schedule

OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")


def _check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")


def _check_bounds(config: RunConfig, **minimums) -> None:
    """Each named field (when given, not None) at least its minimum, or above it for (minimum, "strict"); NaN
    fails both. One line naming the flag: "--epochs must be >= 1, got 0"."""
    for name, minimum in minimums.items():
        bound, strict = (minimum[0], True) if isinstance(minimum, tuple) else (minimum, False)
        value = getattr(config, name)
        if value is not None and not (value > bound if strict else value >= bound):
            raise ValueError(f"{flag(name)} must be {'>' if strict else '>='} {bound}, got {value}")


def _check_rank_list(flag: str, values, world_size: int, minimum: float, what: str) -> None:
    if values is None:
        return
    if len(values) != world_size:
        raise ValueError(f"{flag} needs {world_size} comma-separated values (one per rank), got {len(values)}")
    if any(not v >= minimum for v in values):
        raise ValueError(f"{flag} entries must be {what}, got {','.join(f'{v:g}' for v in values)}")


def _check_writable(out: str | None) -> None:
    """Create the run folder's parent (or runs/) and a scratch file in it: os.access is no proof under root."""
    target = Path(out).expanduser() if out is not None else Path("runs")
    parent = target.parent if out is not None else target
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ValueError(f"--out {out or 'runs'}: cannot create or write {parent.resolve()} "
                         f"({error.strerror or error})") from None


PRECISIONS = ("fp32", "bf16", "fp16")


# Fields a resumed run may change: they do not alter the computation of the steps already taken (a CPU checkpoint
# may continue on GPUs, or on another number of ranks: only the summation order changes). The per-rank settings
# are given anew for the new number of ranks.
RESUME_MAY_CHANGE = {"threads", "epochs", "max_steps", "progress", "checkpoint_every", "checkpoints", "timeout_s", "out",
                     "overwrite", "resume", "data_dir", "download", "device", "gradient_sync",
                     "max_micro_batch", "world_size", "slowdown", "slowdown_trace", "rank_weights"}


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def check_resume(config: RunConfig) -> None:
    """--resume must name a run folder with a checkpoint of the same computation (any world size)."""
    run_dir = Path(config.resume)
    if not run_dir.is_dir():
        raise ValueError(f"--resume {config.resume}: no such run folder")
    if latest_checkpoint(run_dir) is None:
        raise ValueError(f"--resume {config.resume}: the run folder holds no checkpoint to resume from")
    check_same_computation(stored_config(run_dir), config, where=f"--resume {config.resume}")


def check_same_computation(stored: RunConfig, config: RunConfig, *, where: str) -> None:
    """Refuse a resumed configuration that changes anything but RESUME_MAY_CHANGE (one line naming both values)."""
    if stored.norm == "batch" and stored.max_micro_batch != config.max_micro_batch:
        raise ValueError(f"{where}: --max-micro-batch was {stored.max_micro_batch!r} in that run, now "
                         f"{config.max_micro_batch!r}; under --norm batch each micro-batch is normalised on its own, "
                         "so it changes the update: keep it")
    for option in dataclasses.fields(RunConfig):
        if option.name in RESUME_MAY_CHANGE:
            continue
        before, now = getattr(stored, option.name), getattr(config, option.name)
        if _as_tuple(before) != _as_tuple(now):  # config.json stores (16, 32) as [16, 32]; the API may pass either
            raise ValueError(f"{where}: {flag(option.name)} was {before!r} in that "
                             f"run, now {now!r}; a resumed run may only change "
                             f"{', '.join(sorted(RESUME_MAY_CHANGE - {'resume', 'out', 'overwrite'}))}")


def validate_config(config: RunConfig, *, local_world_size: int | None = None) -> str:
    """Raise ValueError (one line: what is wrong, what is allowed) or return a line saying where the data comes from.

    Run this before spawning anything; run() and the CLI both do. local_world_size: the ranks on this machine,
    which is what the GPUs visible here must serve (default: torchrun's LOCAL_WORLD_SIZE in a torchrun process,
    else all of them).
    """
    if local_world_size is None:
        local_world_size = torchrun_identity()[3] if launched_by_torchrun() else config.world_size
    _check_choices(config)
    _check_step(config, local_world_size)
    _check_run_length(config)
    _check_optimizer(config)
    _check_emulation(config)
    _check_batch_policies(config)
    check_device(config.device, local_world_size, sync_bn=config.sync_bn)
    data_source = describe_data_source(config.dataset, data_dir=config.data_dir, train_samples=config.train_samples,
                                       test_samples=config.test_samples, download=config.download)
    if config.resume is not None:
        check_resume(config)
    else:
        _check_writable(config.out)
    return data_source


def _check_choices(config: RunConfig) -> None:
    _check_choice("dataset", config.dataset, DATASET_NAMES)
    _check_choice("model", config.model, MODEL_NAMES)
    _check_choice("norm", config.norm, NORM_CHOICES)
    _check_choice("schedule", config.schedule, tuple(SCHEDULES))
    _check_choice("balancer", config.balancer_name, tuple(BALANCERS))
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("lr scaling", config.lr_scaling, LR_SCALINGS)
    _check_choice("lr decay", config.lr_decay, LR_DECAYS)
    _check_choice("device", config.device, DEVICES)
    _check_choice("gradient sync", config.gradient_sync, GRADIENT_SYNCS)
    _check_choice("precision", config.precision, PRECISIONS)


def _check_step(config: RunConfig, local_world_size: int) -> None:
    """What one step runs on: ranks, threads, loader workers, micro-batches, precision, normalisation."""
    _check_bounds(config, world_size=1, threads=1, loader_workers=0, clip_grad_norm=(0, "strict"),
                  max_micro_batch=1)
    if config.precision == "fp16" and resolve_device(config.device, local_world_size) != "cuda":
        raise ValueError("--precision fp16 needs CUDA (loss scaling); on CPU use --precision bf16")
    if config.sync_bn and config.norm != "batch":
        raise ValueError("--sync-bn needs --norm batch")
    if config.gradient_sync == "fsdp":
        if config.sync_bn or config.precision == "fp16":
            raise ValueError("--gradient-sync fsdp runs without --sync-bn and without --precision fp16 (its loss "
                             "scaler does not take sharded gradients); use ddp or explicit for those")
        if config.noise_measured and config.world_size == 1:
            raise ValueError("--measure-noise with --gradient-sync fsdp needs --world-size >= 2 (one rank has one "
                             "batch size per step); use explicit at one rank")
    _check_bounds(config, timeout_s=(0, "strict"))


def _check_run_length(config: RunConfig) -> None:
    """Epochs, steps, samples, seeds, checkpoints."""
    _check_bounds(config, seed=0, epochs=1, max_steps=1, checkpoint_every=0, eval_bn_samples=0, train_samples=1,
                  test_samples=1)
    if config.train_samples is not None and config.train_samples < config.world_size:
        raise ValueError(f"--train-samples {config.train_samples} is smaller than --world-size {config.world_size}")


def _check_optimizer(config: RunConfig) -> None:
    _check_bounds(config, lr=0, lr_reference_batch=1)
    if not 0 <= config.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {config.momentum}")
    _check_bounds(config, weight_decay=0)
    if config.schedule == "smith" and config.lr_scaling != "none":
        raise ValueError("--schedule smith replaces LR decay by batch growth; --lr-scaling must be none with it")


def _check_emulation(config: RunConfig) -> None:
    """Emulated compute and emulated slow ranks."""
    _check_bounds(config, emulated_sample_ms=(0, "strict"))
    if config.emulated_step_ms is not None and (config.emulated_sample_ms is None or not config.emulated_step_ms >= 0):
        raise ValueError(f"--emulated-step-ms must be >= 0 and needs --emulated-sample-ms, got "
                         f"{config.emulated_step_ms} with --emulated-sample-ms {config.emulated_sample_ms}")
    if config.skip_emulated_sleep and config.emulated_sample_ms is None:
        raise ValueError("--skip-emulated-sleep needs --emulated-sample-ms (the cost it reports)")
    _check_rank_list("--slowdown", config.slowdown, config.world_size, 1.0, ">= 1 (1 = full speed, 3 = 3x slower)")
    SlowdownPlan.from_options(config.world_size, slowdown=config.slowdown, trace=config.slowdown_trace)


def _check_batch_policies(config: RunConfig) -> None:
    """The global batch's bounds, then the schedule's and balancer's own range checks (their constructors')."""
    bounds = BatchBounds.of(config)
    if config.initial_batch < config.world_size:
        raise ValueError(f"--batch-size {config.initial_batch} is smaller than --world-size {config.world_size}: "
                         "every rank needs at least one sample per step")
    if bounds.min_batch < config.world_size:
        raise ValueError(f"--min-batch {bounds.min_batch} is smaller than --world-size {config.world_size}")
    if config.max_batch is not None and config.max_batch < max(bounds.min_batch, config.initial_batch):
        raise ValueError(f"--max-batch {config.max_batch} is smaller than --batch-size/--min-batch")
    if config.max_rank_batch is not None and bounds.max_batch < max(config.initial_batch, bounds.min_batch):
        raise ValueError(f"--max-rank-batch {config.max_rank_batch} x {config.world_size} ranks cannot hold "
                         f"--batch-size {config.initial_batch} / --min-batch {bounds.min_batch}")
    _check_rank_list("--rank-weights", config.rank_weights, config.world_size, 1e-12, "> 0")
    if config.rank_weights is not None and config.balancer_name != "weights":
        raise ValueError(f"--rank-weights applies to the weights balancer, not {config.balancer_name!r}")
    build_schedule(config.schedule, **schedule_options(config))
    build_balancer(config.balancer_name, config.world_size, **balancer_options(config))
