"""The dynbatch side of one Lightning `Trainer.fit`, without Lightning: DynamicBatches driven one optimizer step
(accumulate_grad_batches loader batches) at a time, and the train loader Lightning iterates.

    fit = FitBatches(user_loader, global_batch=48, balancer="pid", accumulate=2, extra_lookahead=1)
    loader = fit.train_loader()           # each epoch: an iterable of the user's batches, exact len()
    share = fit.begin_batch(clock)        # before a batch's forward: this rank's loss factor
    fit.optimizer_stepped(clock)          # after the optimizer step: exchange, observe, plan, maybe end the epoch

Why the loader hands out plain batches: Lightning moves a batch to the device with apply_to_collection, which
rebuilds lists by their type, and a StepPlan (a list of indices with keywords) cannot be rebuilt so. The plans
wait in `delivered`, in the order the batches were read, and begin_batch takes the oldest: batches are trained in
the order they are read, however far the loader or Lightning's fetcher reads ahead.

Why `rewind`: Lightning may call iter() on the train loader twice per epoch (FitLoop.setup_data, then the epoch
loop's on_run_start); an iterator thrown away may have read steps ahead. Each iter() puts the sampler back after
the last trained step (the plans stay), so no step is skipped.

The global batch of an optimizer step is every sample of its accumulate_grad_batches batches on every rank. B is
fixed within an epoch (in-epoch changes are refused), so step s of an epoch starts at s x B and the optimizer step
is known from the first batch on: rank i's mean loss times accumulate x b_i / (samples of the optimizer step), and
Lightning's division by accumulate_grad_batches, leave b_i / (samples of the optimizer step), whose sum over the
batches and ranks is the union batch's mean.
"""
from __future__ import annotations

import math
import time

import torch

from ..engine.dynamic_batches import DynamicBatches
from ..engine.sampler import StepPlan
from ..engine.step import exchange_step_stats

# the DataLoader keywords carried over from the user's train loader (its sampler and batch size are not used)
LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                  "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


def user_loader_options(loader) -> dict:
    """The worker and collate options of the user's DataLoader, as DataLoader keywords."""
    options = {name: getattr(loader, name) for name in LOADER_OPTIONS if hasattr(loader, name)}
    if not options.get("num_workers"):
        options.pop("prefetch_factor", None)
        options.pop("persistent_workers", None)
    return options


def optimizer_step_samples(plan: StepPlan, global_batch: int, num_samples: int, accumulate: int) -> int:
    """Samples of every rank in the optimizer step holding `plan`: the batches plan.step // accumulate groups,
    each B samples from its offset, the epoch's last one short."""
    first = plan.step - plan.step % accumulate
    offsets = (plan.offset + (step - plan.step) * global_batch for step in range(first, first + accumulate))
    return sum(max(0, min(global_batch, num_samples - offset)) for offset in offsets)


class FitBatches:
    """See the module docstring. extra_lookahead: steps read beyond the DataLoader's own prefetch (Lightning's
    fetcher); dynbatch_options: DynamicBatches' keywords (global_batch, balancer, seed, emulation, ...)."""

    def __init__(self, user_loader, *, accumulate: int, extra_lookahead: int = 1, slowdown: float = 1.0,
                 **dynbatch_options):
        self.options = user_loader_options(user_loader)
        self.dataset = user_loader.dataset
        # trained() runs once per `accumulate` batches, while the loader reads on: plan that much further ahead
        self.batches = DynamicBatches(self.dataset, slowdown=slowdown, extra_lookahead=extra_lookahead + accumulate - 1,
                                      **dynbatch_options, **self.options)
        self.accumulate = accumulate
        self.delivered: list[StepPlan] = []       # plans of batches read and not yet trained
        self.step_last: StepPlan | None = None   # the current optimizer step's latest batch (None: none yet)
        self.step_samples = 0                     # every rank's samples in the current optimizer step
        self.rank_samples = 0                     # this rank's
        self.loss_sum: torch.Tensor | float = 0.0   # this rank's summed loss, on its device until the exchange
        self.step_started = 0.0
        self.begun_epoch: int | None = None
        self.position: tuple[int, int, int] = (0, 0, 0)   # (epoch, cursor, steps) after the last trained step
        self.last_exchange: tuple[list[float], list[int]] | None = None   # (compute_s, rank samples) to log

    @property
    def global_batch(self) -> int:
        return self.batches.decisions.batch

    def train_loader(self) -> "PlannedTrainLoader":
        """The loader of the epoch the run is at (begun once, however often Lightning asks)."""
        epoch = self.batches.resume_epoch
        if epoch != self.begun_epoch:
            self.batches.begin_epoch(epoch)
            self.begun_epoch = epoch
            sampler = self.batches.sampler
            self.position = (sampler.epoch, sampler.cursor, sampler.steps_in_epoch)
        return PlannedTrainLoader(self)

    def steps_in_epoch(self) -> int:
        """The epoch's batches, those trained before the resume point included (Lightning counts from the epoch's
        start); exact because B does not change within an epoch."""
        _, cursor, steps = self.position
        return steps + math.ceil((len(self.dataset) - cursor) / self.global_batch)

    def rewind(self) -> None:
        epoch, cursor, steps = self.position
        sampler = self.batches.sampler
        if sampler.epoch == epoch:
            sampler.cursor, sampler.steps_in_epoch = cursor, steps
        self.delivered.clear()
        self.batches.seed_loader(epoch)

    def next_plan(self, expected_step: int) -> StepPlan:
        """The plan of the batch about to be trained; Lightning's batch index must be its step."""
        plan = self.delivered.pop(0)
        if plan.step != expected_step:
            raise RuntimeError(f"dynbatch: Lightning trains batch {expected_step} of the epoch, the sampler handed "
                               f"out step {plan.step}; the sampler's position is authoritative, resume from a "
                               "checkpoint the strategy wrote")
        return plan

    def begin_batch(self, plan: StepPlan, clock) -> float:
        """Account `plan` to its optimizer step (starting the step and its clock at its first batch); returns
        this rank's loss factor: accumulate x b_i / (samples of the optimizer step)."""
        if self.step_last is None:
            self.step_samples = optimizer_step_samples(plan, self.global_batch, len(self.dataset), self.accumulate)
            self.rank_samples, self.loss_sum = 0, 0.0
            self.step_started = time.perf_counter()
            clock.start(batch=0, slowdown=self.batches.slowdown, emulation=self.batches.emulation)
        self.step_last = plan
        self.rank_samples += len(plan)
        clock.batch = self.rank_samples   # the emulated delay, taken at the last bucket, is for all of them
        return self.accumulate * len(plan) / self.step_samples

    def record_loss(self, mean_loss: torch.Tensor, samples: int) -> None:
        self.loss_sum = self.loss_sum + mean_loss.detach().float() * samples   # no device sync per batch

    def optimizer_stepped(self, clock) -> None:
        """After the optimizer step: every rank's compute and samples of it, one balancer observation, the plans
        of the steps ahead, and the epoch's end after its last step."""
        last, self.step_last = self.step_last, None
        batches = self.batches
        compute, rank_samples, loss_sums, _ = exchange_step_stats(
            clock.compute_s, self.rank_samples, float(self.loss_sum), 0.0, rank=batches.rank,
            world_size=batches.world_size, device=batches.device)
        step_s = time.perf_counter() - self.step_started
        batches.trained(last, compute, rank_samples, loss_sums=loss_sums, overhead_s=max(0.0, step_s - max(compute)),
                        samples=self.step_samples)
        self.position = (last.epoch, last.offset + last.global_batch, last.step + 1)
        self.last_exchange = (compute, rank_samples)
        batches.end_epoch_if_last(last)


class PlannedTrainLoader:
    """What Lightning iterates as the train loader: the user's batches, in step order, with an exact len(). It has
    no `sampler` attribute on purpose: Lightning would call set_epoch on it and restart the epoch."""

    def __init__(self, fit: FitBatches):
        self.fit = fit

    def __len__(self) -> int:
        return self.fit.steps_in_epoch()

    def state_dict(self) -> dict:
        """Nothing: the position is in the strategy callback's checkpoint state. (Being stateful tells Lightning
        that a mid-epoch resume is exact.)"""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        self.fit.rewind()
        for batch, plan in self.fit.batches.loader:
            self.fit.delivered.append(plan)
            yield batch
