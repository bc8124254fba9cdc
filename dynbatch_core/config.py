"""The configuration of one training run: one frozen dataclass, its (de)serialisation, and what it gives the
batching policies (the global batch's bounds, each schedule's and balancer's options). Checking it is
engine/validation.py's job.

    config = RunConfig(dataset="mnist", model="resnet20", world_size=2, epochs=2, train_samples=8192)
    RunConfig.from_dict(json.loads(text)); stored_config("runs/<run>")   # from config.json
    schedule = build_schedule(config.schedule, **schedule_options(config))

The CLI (`python -m dynbatch_core train --help`), the notebooks and torchrun all build this same object; every
field's `help` is the flag's documentation.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .batching.balancers import BALANCERS
from .batching.schedules import SCHEDULES


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
    epochs: int = _opt(2, "training epochs (with --lr-scaling adascale: its budget, epochs x training samples "
                          "counted at the initial batch, which can take more real epochs)")
    max_steps: int | None = _opt(None, "stop after this many global steps (smoke runs)")
    initial_batch: int = _opt(64, "initial global batch size (sum over ranks)", flag="batch-size")
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
                                       "after backward), fsdp (FSDP2: fully_shard per residual block, summing "
                                       "reduce-scatters) or auto (ddp on CUDA, explicit on CPU)")
    clip_grad_norm: float | None = _opt(None, "clip the global gradient (summed over ranks) to this L2 norm")
    precision: str = _opt("fp32", "fp32; bf16 (autocast, CPU or CUDA); fp16 (autocast + loss scaling, CUDA only)")
    max_micro_batch: int | None = _opt(None, "a rank's slice larger than this runs as micro-batches with "
                                             "accumulated gradients (memory bound; every rank runs as many, empty "
                                             "ones included). The update is unchanged with --norm none/group; "
                                             "under --norm batch each micro-batch is normalised on its own")
    measure_noise: bool = _opt(False, "estimate the gradient noise scale B_simple from every step's gradient norms "
                                    "(steps.csv rank_grad_sq/global_grad_sq, epochs.csv noise_*); at one rank "
                                    "each step then runs as two halves (under batch norm: half a step more, "
                                    "measured on the side; the update is unchanged either way)")
    loader_workers: int = _opt(0, "DataLoader worker processes per rank (splits are then planned as many steps "
                                  "ahead as the loader prefetches)")
    emulated_step_ms: float | None = _opt(None, "with --emulated-sample-ms: a fixed cost per step on top, in ms "
                                                 "(times the slowdown): step time = (step_ms + b x sample_ms) x k")
    skip_emulated_sleep: bool = _opt(False, "with --emulated-sample-ms: report the emulated cost as each rank's compute "
                                       "time without sleeping it (runs at full speed; time on the emulated "
                                       "hardware is then the sum over steps of the slowest rank's compute_s in "
                                       "steps.csv, while wall_s stays this machine's time)")
    eval_bn_samples: int = _opt(0, "before each evaluation, re-estimate batch-norm running statistics at the "
                                    "current weights from this many training samples (precise BN; the running "
                                    "averages lag the weights when epochs have few steps, as at large batches); "
                                    "0: evaluate with the running averages")
    optimizer: str = _opt("sgd", "sgd or adam")
    lr: float = _opt(0.05, "learning rate at --lr-reference-batch (0 freezes the weights: a measurement run)")
    lr_reference_batch: int | None = _opt(None, "the global batch at which --lr is given; the LR is scaled from it "
                                                "by --lr-scaling (default: the initial batch)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(0.0, "weight decay")
    lr_scaling: str = _opt("none", "how the learning rate follows the batch: none, linear, sqrt (use it for "
                                   "Adam) or adascale (SGD: the gain from the measured noise scale, AdaScale) "
                                   "(relative to --lr-reference-batch)")
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
    def noise_measured(self) -> bool:
        """Whether steps measure the gradient noise scale: --measure-noise, or a policy that reads it (goodput,
        AdaScale)."""
        return self.measure_noise or self.schedule == "goodput" or self.lr_scaling == "adascale"

    @property
    def lr_batch(self) -> int:
        """The global batch at which `lr` holds (lr_reference_batch, else the initial batch)."""
        return self.lr_reference_batch if self.lr_reference_batch is not None else self.initial_batch

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


SCHEDULE_OPTIONS = tuple(dict.fromkeys(name for cls in SCHEDULES.values() for name in cls.options))
BALANCER_OPTIONS = tuple(dict.fromkeys(name for cls in BALANCERS.values() for name in cls.options))


@dataclass(frozen=True)
class BatchBounds:
    """The global batch's range, as a schedule sees it: every rank needs a sample (min_batch defaults to the world
    size), and --max-rank-batch bounds B at world_size x max_rank_batch (an implied --max-batch), so a schedule that
    grows B cannot outgrow what the ranks may hold."""
    min_batch: int
    max_batch: int | None        # None: no limit
    implied_by_rank_cap: bool    # max_batch is world_size x --max-rank-batch, tighter than any --max-batch

    @classmethod
    def of(cls, config: RunConfig) -> "BatchBounds":
        min_batch = config.min_batch if config.min_batch is not None else config.world_size
        max_batch, implied = config.max_batch, False
        if config.max_rank_batch is not None:
            cap = config.world_size * config.max_rank_batch
            implied = max_batch is None or cap < max_batch
            max_batch = cap if max_batch is None else min(max_batch, cap)
        return cls(min_batch, max_batch, implied)


def schedule_options(config: RunConfig) -> dict:
    """build_schedule's keywords for this run (the options each schedule declares, read from the config)."""
    bounds = BatchBounds.of(config)
    return {"initial_batch": config.initial_batch, "min_batch": bounds.min_batch, "max_batch": bounds.max_batch,
            **{name: getattr(config, name) for name in SCHEDULE_OPTIONS}}


def balancer_options(config: RunConfig) -> dict:
    """build_balancer's keywords for this run."""
    return {"min_rank_batch": 1, "max_rank_batch": config.max_rank_batch,
            **{name: getattr(config, name) for name in BALANCER_OPTIONS}}


def flag(name: str) -> str:
    """The command-line flag of RunConfig field `name` (initial_batch keeps its old flag, --batch-size)."""
    option = next(f for f in dataclasses.fields(RunConfig) if f.name == name)
    return "--" + option.metadata.get("flag", name.replace("_", "-"))


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
    if "simulation" in values:
        raise ValueError(f"--resume {run_dir}: a simulated run (python -m dynbatch_core simulate) has no checkpoints "
                         "to resume; simulate it again")
    return RunConfig.from_dict(with_current_names(values))


# Fields renamed since run folders were first written: {old name: new name}. Old config.json files and checkpoints
# still load (stored_config, resume, read_run); RunConfig.from_dict itself accepts only today's names.
RENAMED_FIELDS = {"batch_size": "initial_batch", "noise_scale": "measure_noise",
                  "emulated_clock": "skip_emulated_sleep"}


def with_current_names(values: dict) -> dict:
    """A stored config's values under today's field names."""
    return {RENAMED_FIELDS.get(name, name): value for name, value in values.items()}
