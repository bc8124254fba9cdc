"""A DataLoader whose every batch carries its step's plan, so prefetching worker processes cannot mix up splits.

    sampler = DynamicBatchSampler(len(dataset), rank=rank, world_size=world, require_plans=True)
    loader = planned_loader(dataset, sampler, num_workers=2)          # any DataLoader keyword
    for (images, labels), plan in loader:                             # plan: this step's StepPlan
        loss = uneven_batch_loss(model(images), labels, plan.global_batch)

The sampler yields each step's indices as a StepPlan (a list that also knows the step's split). The loader's
workers fetch with it and hand the plan back beside the collated batch, in order, so the training loop reads the
split and global batch of the step it trains from the batch itself, however far ahead the loader ran.
"""
from __future__ import annotations

from typing import Callable

from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate

from .sampler import DynamicBatchSampler, StepPlan


class PlannedDataset(Dataset):
    """Fetches a StepPlan's samples from `dataset` and returns them with the plan."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, plan: StepPlan):
        if hasattr(self.dataset, "__getitems__"):
            samples = self.dataset.__getitems__(list(plan))
        else:
            samples = [self.dataset[index] for index in plan]
        return samples, plan

    def __getitem__(self, index):
        return self.dataset[index]


class PlannedCollate:
    """Collates the samples with the user's collate_fn and keeps the plan beside them: (batch, plan)."""

    def __init__(self, collate_fn: Callable | None = None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, fetched):
        samples, plan = fetched
        return self.collate_fn(samples), plan


def planned_loader(dataset, sampler: DynamicBatchSampler, *, collate_fn: Callable | None = None,
                   **loader_options) -> DataLoader:
    """A DataLoader over `dataset` driven by `sampler` that yields (batch, StepPlan) pairs, in step order."""
    return DataLoader(PlannedDataset(dataset), batch_sampler=sampler, collate_fn=PlannedCollate(collate_fn),
                      **loader_options)


def prefetch_depth(num_workers: int, prefetch_factor: int | None = None) -> int:
    """How many steps a DataLoader asks its sampler for before the step it returns: 0 without workers."""
    return 0 if num_workers == 0 else num_workers * (prefetch_factor or 2)
