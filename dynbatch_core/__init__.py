"""dynbatch_core: dynamic batch sizing for data-parallel PyTorch training.

    from dynbatch_core import RunConfig, run
    result = run(RunConfig(dataset="mnist", world_size=2, epochs=1, train_samples=2048))
    result.epochs

Three layers (README, Layout): batching/ (pure decisions: schedules, balancers, goodput, noise scale, LR rules),
engine/ (the ranks: sampler, loader, exact step, training loop, launch), study/ (tables, figures, findings, the
report), on top of config.py, records.py, models.py and data.py. Drop-in pieces for your own DDP loop, all
importable from here: DynamicBatchSampler and epoch_order (engine/sampler.py), uneven_batch_loss and GradientSync
(engine/step.py), wrap_ddp and exchange_measurements (engine/ddp_step.py), planned_loader and prefetch_depth
(engine/loader.py), decided_by_rank0 (engine/agreement.py), the balancers and schedules (batching/). For your own
loop, one object holds them all: DynamicBatches (engine/dynamic_batches.py; examples/ddp_loop.py, fsdp_loop.py).
"""
from .batching.balancer_base import Balancer, largest_remainder_split
from .batching.balancers import BALANCERS, build_balancer
from .batching.lr import scaled_lr
from .batching.schedules import SCHEDULES, EpochSummary, Schedule, build_schedule
from .config import RunConfig
from .data import DATASET_NAMES, load_datasets
from .models import MODEL_NAMES, build_model
from .records import RunResult, read_run
from .engine.agreement import check_ranks_agree, decided_by_rank0
from .engine.ddp_step import exchange_measurements, wrap_ddp
from .engine.dynamic_batches import DynamicBatches
from .engine.distributed import exit_without_teardown
from .engine.launch import RunFailed, RunInterrupted, run
from .engine.loader import planned_loader, prefetch_depth
from .engine.sampler import DynamicBatchSampler, epoch_order
from .engine.step import GradientSync, train_step, uneven_batch_loss
from .engine.validation import validate_config

__all__ = ["DynamicBatches", "BALANCERS", "Balancer", "build_balancer", "largest_remainder_split", "RunConfig", "validate_config",
           "DATASET_NAMES", "load_datasets", "RunResult", "read_run", "MODEL_NAMES", "build_model",
           "DynamicBatchSampler", "epoch_order", "SCHEDULES", "EpochSummary", "Schedule", "build_schedule", "scaled_lr",
           "GradientSync", "train_step", "uneven_batch_loss", "wrap_ddp", "exchange_measurements", "planned_loader",
           "prefetch_depth", "run", "RunFailed", "RunInterrupted", "decided_by_rank0",
           "check_ranks_agree", "exit_without_teardown"]
