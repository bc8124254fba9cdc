"""Distributed dynamic batch sampler: one global order per epoch, cut into per-rank slices of any size.

    sampler = DynamicBatchSampler(len(train_set), rank=rank, world_size=world_size, seed=0)
    for epoch in range(epochs):        # (a DataLoader takes it as batch_sampler; loader.planned_loader adds the plans)
        sampler.set_epoch(epoch)
        sampler.set_rank_batches([96, 32])       # may change before any step, without rebuilding the loader
        for plan in sampler:                     # each a StepPlan: this rank's indices, with the step's split
            plan.rank_batches                    # what this step really holds (the last one may be short)

The order of epoch e is a permutation that depends only on (seed, e), never on world size or on the split. Step t
takes the next B_t = sum(rank_batches) indices of that order and gives rank i the contiguous slice
[offset + sum(b_0..b_{i-1}), offset + sum(b_0..b_i)). Every rank computes the same cuts, so all ranks run the same
number of steps and every sample is used exactly once per epoch. When fewer than B_t samples remain, the last step
splits what is left in proportion to the requested split (largest remainder), so a rank may get an empty slice.

Prefetching loaders (worker processes) ask for a step's indices up to num_workers x prefetch_factor steps before
it is trained. So a split can be planned for a given step (`plan_step(step, rank_batches)`, e.g. d steps ahead);
every yielded index list is a `StepPlan`, which carries its epoch, step, offset and true per-rank sizes, and
loader.planned_loader() delivers that plan with the batch, so the training loop learns what it trains from the
batch itself. Steps without a plan use the split last given to `set_rank_batches` (the simple loop without
workers); with `require_plans=True` a missing plan is an error instead.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import torch

from ..batching.decisions import cut_to_remaining


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The global sample order of one epoch: a function of (seed, epoch) only."""
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def rank_slices(rank_batches: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) offsets inside one step's global batch, one per rank."""
    bounds, start = [], 0
    for size in rank_batches:
        bounds.append((start, start + size))
        start += size
    return bounds


FINGERPRINT_INDICES = 1024   # how much of an epoch's order order_fingerprint reads
NOT_GIVEN = object()         # state_dict's `trained` when the caller passed none (None means: no step trained yet)


class StepPlan(list):
    """This rank's indices of one step (a list), plus the step's plan: what every rank holds in it."""

    def __init__(self, indices: Sequence[int], *, epoch: int, step: int, offset: int, rank_batches: Sequence[int]):
        super().__init__(indices)
        self.epoch, self.step, self.offset = epoch, step, offset   # offset: samples of the epoch before this step
        self.rank_batches = list(rank_batches)                    # the step's true split (short at the epoch's end)

    @property
    def global_batch(self) -> int:
        return sum(self.rank_batches)

    def __reduce__(self):  # pickled to loader workers with its plan
        return (_rebuild_plan, (list(self), self.epoch, self.step, self.offset, self.rank_batches))


def _rebuild_plan(indices, epoch, step, offset, rank_batches) -> StepPlan:
    return StepPlan(indices, epoch=epoch, step=step, offset=offset, rank_batches=rank_batches)


class DynamicBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's index slice of each global step; see the module docstring."""

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, rank_batches: Sequence[int] | None = None, require_plans: bool = False):
        if num_samples < 1:
            raise ValueError(f"the sampler needs at least one sample, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.cursor = 0  # samples of this epoch already handed out, summed over all ranks
        self.steps_in_epoch = 0
        self.rank_batches = list(rank_batches) if rank_batches else [1] * world_size
        self.require_plans = require_plans
        self.plans: dict[int, list[int]] = {}  # step of this epoch -> planned split (kept until the epoch ends)
        self._order: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select epoch `epoch` (call before iterating). A different epoch than the current one starts at its first
        sample; the current epoch continues from its cursor (where load_state_dict or an unfinished iteration left
        it), so a resumed run can call set_epoch as usual; a finished current epoch starts over at its first sample."""
        if epoch != self.epoch or self.cursor >= self.num_samples:
            self.epoch, self.cursor, self.steps_in_epoch, self.plans = epoch, 0, 0, {}
        self._order = None

    def plan_step(self, step: int, rank_batches: Sequence[int]) -> None:
        """The split of step `step` of the current epoch (every rank must plan the same); a step plans once."""
        self._check_split(rank_batches)
        if step < self.steps_in_epoch:
            raise ValueError(f"step {step} of epoch {self.epoch} was already handed to the loader (it is at step "
                             f"{self.steps_in_epoch}): plan at least as far ahead as the loader prefetches")
        self.plans[step] = [int(size) for size in rank_batches]

    def set_rank_batches(self, rank_batches: Sequence[int]) -> None:
        """Per-rank batch sizes of the next unplanned steps; every rank must pass the same list."""
        self._check_split(rank_batches)
        self.rank_batches = [int(size) for size in rank_batches]

    def _check_split(self, rank_batches: Sequence[int]) -> None:
        if len(rank_batches) != self.world_size or any(size < 0 for size in rank_batches) or sum(rank_batches) < 1:
            raise ValueError(f"rank_batches must be {self.world_size} sizes >= 0 summing to >= 1, got {list(rank_batches)}")

    @property
    def remaining(self) -> int:
        return self.num_samples - self.cursor

    def requested_batches(self) -> list[int]:
        """The split asked for the next step: its plan, else the last set_rank_batches split."""
        planned = self.plans.get(self.steps_in_epoch)
        if planned is None and self.require_plans:
            raise RuntimeError(f"no split planned for step {self.steps_in_epoch} of epoch {self.epoch}: the loader "
                               "prefetches further ahead than the splits were planned")
        return list(planned if planned is not None else self.rank_batches)

    def __iter__(self) -> Iterator[StepPlan]:
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)
        while self.cursor < self.num_samples:
            step_batches = cut_to_remaining(self.requested_batches(), self.remaining)
            start, stop = rank_slices(step_batches)[self.rank]
            plan = StepPlan(order[self.cursor + start:self.cursor + stop].tolist(), epoch=self.epoch,
                            step=self.steps_in_epoch, offset=self.cursor, rank_batches=step_batches)
            self.cursor += sum(step_batches)
            self.steps_in_epoch += 1
            yield plan

    def __len__(self) -> int:
        """Steps left in this epoch if the split stays as it is now."""
        return -(-self.remaining // sum(self.rank_batches))

    def order_fingerprint(self) -> str:
        """A short hash of the current epoch's first indices: ranks that cut different orders (another torch build
        on one node) compare it once per epoch instead of silently training some samples twice and others never."""
        head = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)[:FINGERPRINT_INDICES]
        return hashlib.sha1(head.to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    def state_dict(self, trained: StepPlan | None = NOT_GIVEN) -> dict:
        """The position to resume from. With a prefetching loader the sampler runs ahead of training: pass the last
        trained step's plan (`trained`) to record the position after it, with the plans of every later step (the
        ones already handed to the loader included, so steps must be planned), so a resumed run trains exactly
        the same steps. With require_plans=True `trained` must be given (None: no step trained yet): the cursor
        alone is as far as the loader has read ahead, and a resume from it would skip those steps."""
        if trained is NOT_GIVEN:
            if self.require_plans:
                raise TypeError("DynamicBatchSampler.state_dict(trained=plan): with require_plans=True pass the plan "
                                "of the last step trained (None before the first), not the cursor the loader read "
                                "ahead to")
            trained = None
        cursor, steps = self.cursor, self.steps_in_epoch
        if trained is not None and trained.epoch == self.epoch and trained.step + 1 < self.steps_in_epoch:
            cursor, steps = trained.offset + trained.global_batch, trained.step + 1
        return {"epoch": self.epoch, "cursor": cursor, "steps_in_epoch": steps, "seed": self.seed,
                "num_samples": self.num_samples, "rank_batches": list(self.rank_batches),
                "plans": [[step, list(split)] for step, split in sorted(self.plans.items()) if step >= steps]}

    def load_state_dict(self, state: dict) -> None:
        """Continue mid-epoch; the position is global, so a different world size can resume it (re-cut)."""
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['num_samples']} samples with seed {state['seed']}, "
                             f"this sampler has {self.num_samples} samples with seed {self.seed}")
        self.epoch, self.cursor, self.steps_in_epoch = state["epoch"], state["cursor"], state["steps_in_epoch"]
        self.plans = {}
        if len(state["rank_batches"]) == self.world_size:
            self.rank_batches = list(state["rank_batches"])
            self.plans = {int(step): list(split) for step, split in state.get("plans", [])}
