"""dynbatch_core: dynamic batch sizing for data-parallel PyTorch training.

    from dynbatch_core import RunConfig, run
    result = run(RunConfig(dataset="mnist", world_size=2, epochs=1, train_samples=2048))
    result.epochs

Three layers (README, Layout): batching/ (pure decisions: schedules, balancers, goodput, noise scale, LR rules),
engine/ (the ranks: sampler, loader, exact step, training loop, launch), study/ (tables, figures, findings, the
report), on top of config.py, records.py, models.py and data.py; simulation/ drives batching/'s decisions for
simulated clusters without torch. Drop-in pieces for your own DDP loop, all importable from here:
DynamicBatchSampler and epoch_order (engine/sampler.py), uneven_batch_loss and GradientSync (engine/step.py),
wrap_ddp and exchange_measurements (engine/ddp_step.py), planned_loader and prefetch_depth (engine/loader.py),
decided_by_rank0 (engine/agreement.py), the balancers and schedules (batching/). For your own loop, one object
holds them all: DynamicBatches (engine/dynamic_batches.py; examples/ddp_loop.py, fsdp_loop.py); under
Lightning's Trainer, `from dynbatch_core.integrations.lightning import DynamicBatchesStrategy` (the lightning
extra; not a name of this package, so that `from dynbatch_core import *` works without lightning).

Names are imported on first use (PEP 562), so `import dynbatch_core.batching` or the simulator never loads torch.
"""
import importlib

_SOURCES = {   # public name -> the module that defines it
    "Balancer": "batching.balancer_base", "largest_remainder_split": "batching.balancer_base",
    "BALANCERS": "batching.balancers", "build_balancer": "batching.balancers",
    "scaled_lr": "batching.lr",
    "SCHEDULES": "batching.schedules", "EpochSummary": "batching.schedules", "Schedule": "batching.schedules",
    "build_schedule": "batching.schedules",
    "RunConfig": "config",
    "DATASET_NAMES": "data", "load_datasets": "data",
    "MODEL_NAMES": "models", "build_model": "models",
    "RunResult": "records", "read_run": "records",
    "check_ranks_agree": "engine.agreement", "decided_by_rank0": "engine.agreement",
    "exchange_measurements": "engine.ddp_step", "wrap_ddp": "engine.ddp_step",
    "DynamicBatches": "engine.dynamic_batches",
    "exit_without_teardown": "engine.distributed",
    "RunFailed": "engine.launch", "RunInterrupted": "engine.launch", "run": "engine.launch",
    "planned_loader": "engine.loader", "prefetch_depth": "engine.loader",
    "DynamicBatchSampler": "engine.sampler", "epoch_order": "engine.sampler",
    "GradientSync": "engine.step", "train_step": "engine.step", "uneven_batch_loss": "engine.step",
    "validate_config": "engine.validation",
    "simulate": "simulation.simulator",
}

__all__ = list(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'dynbatch_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_SOURCES))
