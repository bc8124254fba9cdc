"""dynbatch_core: dynamic batch sizing for data-parallel PyTorch training.

    from dynbatch_core import RunConfig, run
    result = run(RunConfig(dataset="mnist", world_size=2, epochs=1, train_samples=2048))
    result.epochs

Drop-in pieces for your own DDP loop: DynamicBatchSampler (sampler.py), uneven_batch_loss and GradientSync
(step.py), wrap_ddp (ddp_step.py), planned_loader (loader.py), the balancers (balancers.py) and schedules (schedules.py), decided_by_rank0 (agreement.py).
"""
from .agreement import check_ranks_agree, decided_by_rank0
from .balancer_base import Balancer, largest_remainder_split
from .balancers import BALANCERS, build_balancer
from .config import RunConfig
from .validation import validate_config
from .data import DATASET_NAMES, load_datasets
from .metrics import RunResult, read_run
from .models import MODEL_NAMES, build_model
from .sampler import DynamicBatchSampler, epoch_order
from .lr import scaled_lr
from .schedules import SCHEDULES, EpochSummary, Schedule, build_schedule
from .step import GradientSync, train_step, uneven_batch_loss
from .ddp_step import exchange_measurements, wrap_ddp
from .loader import planned_loader, prefetch_depth
from .launch import RunFailed, RunInterrupted, run
from .distributed import exit_without_teardown

__all__ = ["BALANCERS", "Balancer", "build_balancer", "largest_remainder_split", "RunConfig", "validate_config",
           "DATASET_NAMES", "load_datasets", "RunResult", "read_run", "MODEL_NAMES", "build_model",
           "DynamicBatchSampler", "epoch_order", "SCHEDULES", "EpochSummary", "Schedule", "build_schedule", "scaled_lr",
           "GradientSync", "train_step", "uneven_batch_loss", "wrap_ddp", "exchange_measurements", "planned_loader",
           "prefetch_depth", "run", "RunFailed", "RunInterrupted", "decided_by_rank0",
           "check_ranks_agree", "exit_without_teardown"]
