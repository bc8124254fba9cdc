"""A DataLoader whose every batch carries its step's plan, so prefetching worker processes cannot mix up splits.

    sampler = DynamicBatchSampler(len(dataset), rank=rank, world_size=world, require_plans=True)
    loader = planned_loader(dataset, sampler, num_workers=2, prefetch_factor=4)
    lookahead = prefetch_depth(loader)                                # plan splits this many steps ahead
    for (images, labels), plan in loader:                             # plan: this step's StepPlan
        loss = uneven_batch_loss(model(images), labels, plan.global_batch)

The sampler yields each step's indices as a StepPlan (a list that also knows the step's split). The loader's
workers fetch with it and hand the plan back beside the collated batch, in order, so the training loop reads the
split and global batch of the step it trains from the batch itself, however far ahead the loader ran.

DataLoader keywords: the worker options (num_workers, prefetch_factor, persistent_workers, pin_memory,
worker_init_fn, generator, timeout, ...) work as usual. Not these: batch_size, shuffle, sampler and drop_last (the
sampler decides the batches; DataLoader itself refuses them beside a batch_sampler) and in_order=False (batches
would arrive out of step order: a rank would train another step than its peers). An empty slice (the short last
step of an epoch can leave a rank without samples) is built here, never handed to the user's collate_fn: one
sample is fetched and collated, and every tensor of the batch is cut to length 0 (a list of per-sample values,
such as strings, becomes []), so the model still runs forward and backward on it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate

from ..batching.decisions import loader_lookahead
from .sampler import DynamicBatchSampler, StepPlan


class PlannedDataset(Dataset):
    """Fetches a StepPlan's samples from `dataset` and returns them with the plan."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, plan: StepPlan):
        indices = list(plan) or [0]   # an empty slice: one sample, for the shape of the batch (cut to 0 later)
        if hasattr(self.dataset, "__getitems__"):
            samples = self.dataset.__getitems__(indices)
        else:
            samples = [self.dataset[index] for index in indices]
        return samples, plan

    def __getitem__(self, index):
        return self.dataset[index]


class PlannedCollate:
    """Collates the samples with the user's collate_fn and keeps the plan beside them: (batch, plan)."""

    def __init__(self, collate_fn: Callable | None = None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, fetched):
        samples, plan = fetched
        batch = self.collate_fn(samples)
        return (batch if len(plan) else empty_like_batch(batch)), plan


def empty_like_batch(batch):
    """`batch` with every tensor (and list) cut to length 0 along its first dimension, its structure kept."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, dict):
        return type(batch)({key: empty_like_batch(value) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):   # a namedtuple
        return type(batch)(*(empty_like_batch(value) for value in batch))
    if isinstance(batch, tuple):
        return tuple(empty_like_batch(value) for value in batch)
    if isinstance(batch, list):   # fields collated into a list (default_collate of tuples), or per-sample values
        nested = any(isinstance(value, (torch.Tensor, dict, list, tuple)) for value in batch)
        return [empty_like_batch(value) for value in batch] if nested else []
    return batch


def planned_loader(dataset, sampler: DynamicBatchSampler, *, collate_fn: Callable | None = None,
                   **loader_options) -> DataLoader:
    """A DataLoader over `dataset` driven by `sampler` that yields (batch, StepPlan) pairs, in step order."""
    if loader_options.get("in_order", True) is False:
        raise ValueError("planned_loader: in_order=False would hand batches out of step order (a rank would train "
                         "another step than its peers); leave it True")
    return DataLoader(PlannedDataset(dataset), batch_sampler=sampler, collate_fn=PlannedCollate(collate_fn),
                      **loader_options)


def prefetch_depth(loader: DataLoader) -> int:
    """How many steps `loader` asks its sampler for before the step it returns (0 without workers), read from the
    loader's own num_workers and prefetch_factor: plan each step's split at least this many steps ahead."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"prefetch_depth(loader) takes the DataLoader itself (its num_workers and prefetch_factor), "
                        f"got {type(loader).__name__}")
    return loader_lookahead(loader.num_workers, loader.prefetch_factor)
