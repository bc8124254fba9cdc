"""The configuration of one training run: one frozen dataclass, one validation function.

    config = RunConfig(dataset="mnist", model="resnet20", world_size=2, epochs=2, train_samples=8192)
    validate_config(config)          # ValueError with one clear line, before anything is spawned

The CLI (`python -m dynbatch_core train --help`), the notebooks and torchrun all build this same object; every
field's `help` is the flag's documentation.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str = _opt("mnist", "dataset: mnist, cifar10 or synthetic")
    data_dir: str | None = _opt(None, "folder holding mnist.npz / cifar10.npz (or torchvision's files); "
                                      "default: $DYNBATCH_DATA, else the small embedded subset")
    download: bool = _opt(False, "download the dataset with torchvision (needs internet)")
    train_samples: int | None = _opt(None, "use the first N training samples (default: all)")
    test_samples: int | None = _opt(None, "use the first N test samples (default: all)")
    augment: bool = _opt(True, "random crop + flip on cifar10 training images")
    # model
    model: str = _opt("resnet20", "model name (see the list above)")
    norm: str = _opt("batch", "normalisation layers: batch, group or none (none/group make uneven splits exact)")
    sync_bn: bool = _opt(False, "SyncBatchNorm across ranks (CUDA only): batch statistics of the union batch")
    # processes
    world_size: int = _opt(2, "number of ranks (processes)")
    device: str = _opt("auto", "auto (CUDA with one GPU per rank when enough are visible, else CPU), cpu or cuda")
    threads: int | None = _opt(None, "CPU threads per rank (default: this machine's cores // its ranks, at least 1)")
    timeout_s: float = _opt(300.0, "seconds a collective may block before the run fails")
    # optimisation
    epochs: int = _opt(2, "training epochs")
    max_steps: int | None = _opt(None, "stop after this many global steps (smoke runs)")
    batch_size: int = _opt(64, "initial global batch size (sum over ranks)")
    schedule: str = _opt("static", "global batch schedule")
    min_batch: int | None = _opt(None, "smallest global batch a schedule may choose (default: world size)")
    max_batch: int | None = _opt(None, "largest global batch a schedule may choose (default: no limit)")
    # schedule options (each schedule reads the ones it needs)
    every: int = _opt(1, "increasing/decreasing: double/halve the global batch every N epochs")
    plateau_window: int = _opt(2, "loss-plateau: epochs k over which progress P_k is measured")
    plateau_threshold: float = _opt(50.0, "loss-plateau: double B when P_k = 1000*(sum loss/(k*min loss) - 1) "
                                          "falls below this, else halve")
    time_budget_s: float | None = _opt(None, "loss-plateau: also double B when an epoch took longer than this")
    score_tolerance: float = _opt(0.02, "score: keep B when the score changed by less than this (relative)")
    probe_sizes: tuple[int, ...] = _opt((16, 32, 64, 128), "probe: candidate global batches, one epoch "
                                        "each; then keeps the one with the fastest log-loss decrease per second",
                                        list_of=int)
    smith_epochs: tuple[int, ...] = _opt((), "smith: epochs at which a step LR schedule would divide the LR",
                                         list_of=int)
    smith_factor: float = _opt(2.0, "smith: that division factor f (B is multiplied by f instead)")
    decide_every: int = _opt(50, "goodput: steps between decisions of the global batch")
    goodput_threshold: float = _opt(0.05, "goodput: change B only when the predicted goodput gains more than this")
    warmup_steps: int = _opt(0, "steps of linear LR warm-up after each increase of the global batch")
    balancer: str | None = _opt(None, "per-rank split of the global batch (default: weights if --rank-weights "
                                      "is given, else equal)")
    rank_weights: tuple[float, ...] | None = _opt(None, "fixed per-rank shares for the weights balancer, e.g. 3,13",
                                                  list_of=float)
    max_rank_batch: int | None = _opt(None, "largest batch any one rank may hold (memory guard); also caps the "
                                             "global batch at world size x this")
    balance_every: int = _opt(3, "pid: steps between split updates")
    pid_kp: float = _opt(0.6, "pid: proportional gain (fraction of the distance to the target split per update)")
    pid_ki: float = _opt(0.05, "pid: integral gain")
    pid_ema: float = _opt(0.6, "pid: weight of the newest throughput sample in the moving average")
    dead_band: float = _opt(0.05, "pid: no change while the ranks' step times differ by less than this fraction "
                                    "(keep it above the step-time noise of one --balance-every window; 4 ranks sharing 2 cores "
                                    "show 0.17-0.21 even when identical)")
    max_change: float = _opt(0.25, "pid: largest change of one rank's batch per update, as a fraction of B/n")
    model_window: int = _opt(24, "model: steps of each rank's (batch, compute time) history its step-time line is "
                                 "fitted to")
    slowdown: tuple[float, ...] | None = _opt(None, "emulate rank i being k_i times slower, e.g. 1,3", list_of=float)
    slowdown_trace: str | None = _opt(None, "slowdown over time: CSV file (step,k_0,...) or inline '0:1,1;100:1,3'")
    emulated_sample_ms: float | None = _opt(None, "emulate compute: a 1x rank takes exactly this many ms per "
                                                   "sample (times its slowdown); makes balancer decisions "
                                                   "independent of timing noise")
    gradient_sync: str = _opt("auto", "how gradients are summed: ddp (stock DistributedDataParallel with a summing "
                                       "comm hook, overlapped with backward), explicit (one bucketed all-reduce "
                                       "after backward) or auto (ddp on CUDA, explicit on CPU)")
    clip_grad_norm: float | None = _opt(None, "clip the global gradient (summed over ranks) to this L2 norm")
    precision: str = _opt("fp32", "fp32; bf16 (autocast, CPU or CUDA); fp16 (autocast + loss scaling, CUDA only)")
    max_micro_batch: int | None = _opt(None, "a rank's slice larger than this runs as micro-batches with "
                                             "accumulated gradients (memory bound; the update is unchanged)")
    noise_scale: bool = _opt(False, "estimate the gradient noise scale B_simple from every step's gradient norms "
                                    "(steps.csv rank_grad_sq/global_grad_sq, epochs.csv noise_*); at one rank "
                                    "each step then runs as two halves")
    loader_workers: int = _opt(0, "DataLoader worker processes per rank (splits are then planned as many steps "
                                  "ahead as the loader prefetches)")
    emulated_step_ms: float | None = _opt(None, "with --emulated-sample-ms: a fixed cost per step on top, in ms "
                                                 "(times the slowdown): step time = (step_ms + b x sample_ms) x k")
    emulated_clock: bool = _opt(False, "with --emulated-sample-ms: report the emulated cost as each rank's compute "
                                       "time without sleeping it (runs at full speed; time on the emulated "
                                       "hardware is then the sum over steps of the slowest rank's compute_s in "
                                       "steps.csv, while wall_s stays this machine's time)")
    eval_bn_samples: int = _opt(0, "before each evaluation, re-estimate batch-norm running statistics at the "
                                    "current weights from this many training samples (precise BN; the running "
                                    "averages lag the weights when epochs have few steps, as at large batches); "
                                    "0: evaluate with the running averages")
    optimizer: str = _opt("sgd", "sgd or adam")
    lr: float = _opt(0.05, "learning rate at the initial batch size (0 freezes the weights: a measurement run)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(0.0, "weight decay")
    lr_scaling: str = _opt("none", "how the learning rate follows the batch: none, linear, sqrt (use it for "
                                   "Adam) or adascale (SGD: the gain from the measured noise scale, AdaScale) "
                                   "(relative to the initial batch)")
    lr_decay: str = _opt("cosine", "learning-rate decay over the run's samples: cosine (to 0 at the last epoch) "
                                   "or none")
    seed: int = _opt(0, "seed of the model init and the sample order")
    # outputs
    out: str | None = _opt(None, "run folder for steps.csv, epochs.csv, config.json, model.pt "
                                 "(default: a new folder under runs/)")
    checkpoint_every: int = _opt(0, "also checkpoint every N global steps (0: only at the end of each epoch)")
    checkpoints: bool = _opt(True, "write checkpoints into the run folder (needed for --resume)")
    resume: str | None = _opt(None, "continue the run in this folder from its latest checkpoint, on any number of "
                                    "ranks (other flags default to that run's values)")
    overwrite: bool = _opt(False, "allow writing into an existing, non-empty run folder")
    progress: bool = _opt(True, "show a progress bar on rank 0")

    @property
    def balancer_name(self) -> str:
        if self.balancer is not None:
            return self.balancer
        return "weights" if self.rank_weights else "equal"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")


def _check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")


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
SCHEDULE_OPTIONS = ("every", "plateau_window", "plateau_threshold", "time_budget_s", "score_tolerance",
                    "probe_sizes", "smith_epochs", "smith_factor", "decide_every", "goodput_threshold")
BALANCER_OPTIONS = ("balance_every", "pid_kp", "pid_ki", "pid_ema", "dead_band", "max_change", "model_window")


def schedule_options(config: RunConfig) -> dict:
    """The schedule's options. --max-rank-batch bounds the global batch too: B never exceeds world_size x
    max_rank_batch (an implied --max-batch), so a schedule that grows B cannot outgrow what the ranks may hold."""
    max_batch = config.max_batch
    if config.max_rank_batch is not None:
        cap = config.world_size * config.max_rank_batch
        max_batch = cap if max_batch is None else min(max_batch, cap)
    return {"initial_batch": config.batch_size,
            "min_batch": config.min_batch if config.min_batch is not None else config.world_size,
            "max_batch": max_batch, **{name: getattr(config, name) for name in SCHEDULE_OPTIONS}}


def balancer_options(config: RunConfig) -> dict:
    return {"rank_weights": config.rank_weights, "min_rank_batch": 1, "max_rank_batch": config.max_rank_batch,
            **{name: getattr(config, name) for name in BALANCER_OPTIONS}}


# Fields a resumed run may change: they do not alter the computation of the steps already taken (a CPU checkpoint
# may continue on GPUs, or on another number of ranks: only the summation order changes). The per-rank settings
# are given anew for the new number of ranks.
RESUME_MAY_CHANGE = {"threads", "epochs", "max_steps", "progress", "checkpoint_every", "checkpoints", "timeout_s", "out",
                     "overwrite", "resume", "data_dir", "download", "device", "gradient_sync",
                     "max_micro_batch", "world_size", "slowdown", "slowdown_trace", "rank_weights"}


def stored_config(run_dir: str | Path) -> RunConfig:
    """The configuration a run folder was started with (its config.json)."""
    path = Path(run_dir) / "config.json"
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--resume {run_dir}: no config.json there (not a dynbatch run folder)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"--resume {run_dir}: config.json is corrupt ({error})") from None
    values.pop("resolved", None)
    return RunConfig.from_dict(values)


def _as_tuple(value):
    return tuple(value) if isinstance(value, list) else value


def check_resume(config: RunConfig) -> None:
    """--resume must name a run folder with a checkpoint of the same computation (any world size)."""
    from .checkpoint import latest_checkpoint
    run_dir = Path(config.resume)
    if not run_dir.is_dir():
        raise ValueError(f"--resume {config.resume}: no such run folder")
    if latest_checkpoint(run_dir) is None:
        raise ValueError(f"--resume {config.resume}: the run folder holds no checkpoint to resume from")
    check_same_computation(stored_config(run_dir), config, where=f"--resume {config.resume}")


def check_same_computation(stored: RunConfig, config: RunConfig, *, where: str) -> None:
    """Refuse a resumed configuration that changes anything but RESUME_MAY_CHANGE (one line naming both values)."""
    for option in dataclasses.fields(RunConfig):
        if option.name in RESUME_MAY_CHANGE:
            continue
        before, now = getattr(stored, option.name), getattr(config, option.name)
        if _as_tuple(before) != _as_tuple(now):  # config.json stores (16, 32) as [16, 32]; the API may pass either
            raise ValueError(f"{where}: --{option.name.replace('_', '-')} was {before!r} in that "
                             f"run, now {now!r}; a resumed run may only change "
                             f"{', '.join(sorted(RESUME_MAY_CHANGE - {'resume', 'out', 'overwrite'}))}")


def validate_config(config: RunConfig) -> str:
    """Raise ValueError (one line: what is wrong, what is allowed) or return a line saying where the data comes from.

    Run this before spawning anything; run() and the CLI both do.
    """
    from .balancers import BALANCERS, build_balancer
    from .data import DATASET_NAMES, describe_data_source
    from .distributed import GRADIENT_SYNCS, check_device, resolve_device
    from .lr import LR_DECAYS, LR_SCALINGS
    from .models import MODEL_NAMES, NORM_CHOICES
    from .schedules import SCHEDULES, build_schedule

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
    if config.clip_grad_norm is not None and not config.clip_grad_norm > 0:
        raise ValueError(f"--clip-grad-norm must be > 0, got {config.clip_grad_norm}")
    if config.max_micro_batch is not None and config.max_micro_batch < 1:
        raise ValueError(f"--max-micro-batch must be >= 1, got {config.max_micro_batch}")
    if config.precision == "fp16" and resolve_device(config.device, config.world_size) != "cuda":
        raise ValueError("--precision fp16 needs CUDA (loss scaling); on CPU use --precision bf16")
    if config.loader_workers < 0:
        raise ValueError(f"--loader-workers must be >= 0, got {config.loader_workers}")
    if config.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {config.world_size}")
    if config.batch_size < config.world_size:
        raise ValueError(f"--batch-size {config.batch_size} is smaller than --world-size {config.world_size}: "
                         "every rank needs at least one sample per step")
    if config.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {config.seed}")
    if config.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {config.epochs}")
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {config.threads}")
    if config.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {config.checkpoint_every}")
    if config.emulated_sample_ms is not None and not config.emulated_sample_ms > 0:
        raise ValueError(f"--emulated-sample-ms must be > 0, got {config.emulated_sample_ms}")
    if config.emulated_step_ms is not None and (config.emulated_sample_ms is None or not config.emulated_step_ms >= 0):
        raise ValueError(f"--emulated-step-ms must be >= 0 and needs --emulated-sample-ms, got "
                         f"{config.emulated_step_ms} with --emulated-sample-ms {config.emulated_sample_ms}")
    if config.eval_bn_samples < 0:
        raise ValueError(f"--eval-bn-samples must be >= 0, got {config.eval_bn_samples}")
    if config.emulated_clock and config.emulated_sample_ms is None:
        raise ValueError("--emulated-clock needs --emulated-sample-ms (the cost it reports)")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {config.max_steps}")
    for flag, value in (("--train-samples", config.train_samples), ("--test-samples", config.test_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if config.train_samples is not None and config.train_samples < config.world_size:
        raise ValueError(f"--train-samples {config.train_samples} is smaller than --world-size {config.world_size}")
    if not config.lr >= 0:
        raise ValueError(f"--lr must be >= 0, got {config.lr}")
    if not 0 <= config.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {config.momentum}")
    if not config.weight_decay >= 0:
        raise ValueError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if not config.timeout_s > 0:
        raise ValueError(f"--timeout-s must be > 0, got {config.timeout_s}")
    _check_rank_list("--rank-weights", config.rank_weights, config.world_size, 1e-12, "> 0")
    _check_rank_list("--slowdown", config.slowdown, config.world_size, 1.0, ">= 1 (1 = full speed, 3 = 3x slower)")
    from .hetero import SlowdownPlan
    SlowdownPlan.from_options(config.world_size, slowdown=config.slowdown, trace=config.slowdown_trace)
    if config.rank_weights is not None and config.balancer_name != "weights":
        raise ValueError(f"--rank-weights applies to the weights balancer, not {config.balancer_name!r}")
    min_batch = config.min_batch if config.min_batch is not None else config.world_size
    if min_batch < config.world_size:
        raise ValueError(f"--min-batch {min_batch} is smaller than --world-size {config.world_size}")
    if config.max_batch is not None and config.max_batch < max(min_batch, config.batch_size):
        raise ValueError(f"--max-batch {config.max_batch} is smaller than --batch-size/--min-batch")
    if config.max_rank_batch is not None and config.max_rank_batch * config.world_size < max(config.batch_size,
                                                                                             min_batch):
        raise ValueError(f"--max-rank-batch {config.max_rank_batch} x {config.world_size} ranks cannot hold "
                         f"--batch-size {config.batch_size} / --min-batch {min_batch}")
    if config.sync_bn and config.norm != "batch":
        raise ValueError("--sync-bn needs --norm batch")
    if config.schedule == "smith" and config.lr_scaling != "none":
        raise ValueError("--schedule smith replaces LR decay by batch growth; --lr-scaling must be none with it")
    build_schedule(config.schedule, **schedule_options(config))       # their own range checks, one line each
    build_balancer(config.balancer_name, config.world_size, **balancer_options(config))
    check_device(config.device, config.world_size, sync_bn=config.sync_bn)
    data_source = describe_data_source(config.dataset, data_dir=config.data_dir, train_samples=config.train_samples,
                                       test_samples=config.test_samples, download=config.download)
    if config.resume is not None:
        check_resume(config)
    else:
        _check_writable(config.out)
    return data_source
