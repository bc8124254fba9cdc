"""One object for your own training loop: exact uneven per-rank batches, a balancer and a schedule, on stock DDP or
FSDP2, in three touch points.

    batches = DynamicBatches(dataset, global_batch=48, balancer="pid", num_workers=2, prefetch_factor=4)
    model = batches.prepare(model, optimizer)             # DDP with a summing hook, or your fully_shard-ed model
    for epoch in range(epochs):
        for (features, labels), step in batches.epoch(epoch):
            loss = step.scale(F.cross_entropy(model(features), labels))   # mean loss x this rank's share b_i / B
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

What it owns: the sampler (one global order per epoch cut into per-rank slices), the DataLoader on it (your
options: num_workers, prefetch_factor, collate_fn, pin_memory, persistent_workers, ...), the lookahead those
options imply (splits are planned as far ahead as the loader reads), rank 0's decisions broadcast to every rank
(batching/decisions.py), the per-step exchange of every rank's compute time, batch and loss, the balancer's and
schedule's observations, and the LR the schedule implies (`prepare(model, optimizer)`: each param group's LR is its
initial LR scaled from the initial B by `lr_scaling`, times the schedule's factor). `state_dict()` holds where the
run stands, mid-epoch included; with your model's and optimizer's state it resumes exactly.

The loss: the gradients are summed over ranks, so each rank's loss must be its share of the union batch's mean:
    step.scale(mean_loss)          a loss averaged over this rank's samples, times b_i / B
    step.scale_sum(summed_loss)    a loss summed over this rank's samples, divided by B
    step.scale_weighted(summed_loss, weight)   per-token losses: divided by the weight (token count) summed over
                                   every rank (one all-reduce), as when one process averages over all tokens
An empty slice (the short last step of an epoch can leave a rank without samples) gives a loss of value 0 that
still runs backward, so every rank reaches the gradient reduction. Micro-batches: `for micro in
step.micro_batches(batch, size)`: every rank runs ceil(max_j b_j / size) of them (empty ones pad), gradients are
reduced after the last only; scale each with `micro.scale(mean_loss)`. Clip after backward as usual: the gradient
every rank holds is the global one.

The engine's RankTrainer drives the same object through begin_epoch / trained / end_epoch with its own step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Sequence

import torch
import torch.distributed as dist

from ..batching.balancer_base import Balancer
from ..batching.balancers import build_balancer
from ..batching.decisions import RunDecisions
from ..batching.lr import LR_SCALINGS, scaled_lr
from ..batching.schedules import EpochSummary, Schedule, build_schedule
from .agreement import check_ranks_agree, decided_by_rank0, max_over_ranks
from .emulation import Emulation
from .loader import empty_like_batch, planned_loader, prefetch_depth
from .sampler import DynamicBatchSampler, StepPlan
from .step import exchange_step_stats, micro_batch_count


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s own random numbers (after the model's initialisation, which all ranks share)."""
    return seed * 1_000_003 + 7_919 * (rank + 1)


class DynamicBatches:
    """See the module docstring. global_batch: an int (a static schedule) or a batching Schedule; balancer: a
    name (build_balancer, with balancer_options) or a Balancer; loader_options: DataLoader keywords;
    extra_lookahead: steps read ahead beyond the loader's own prefetch (a framework's fetcher, say)."""

    def __init__(self, dataset, *, global_batch: int | Schedule, balancer: str | Balancer = "pid",
                 balancer_options: dict | None = None, seed: int = 0, shuffle: bool = True,
                 lr_scaling: str = "linear", slowdown: float = 1.0, emulation: Emulation | None = None,
                 device: torch.device | str | None = None, rank: int | None = None, world_size: int | None = None,
                 extra_lookahead: int = 0, **loader_options):
        refused = sorted(set(loader_options) & {"batch_size", "sampler", "batch_sampler", "drop_last"})
        if refused:
            raise ValueError(f"DynamicBatches decides the batches itself: leave out {', '.join(refused)} (the global "
                             "batch is global_batch=, the order is seed= and shuffle=)")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if lr_scaling not in LR_SCALINGS or lr_scaling == "adascale":
            raise ValueError(f"lr_scaling must be one of none, linear, sqrt, got {lr_scaling!r}")
        self.schedule = global_batch if isinstance(global_batch, Schedule) else \
            build_schedule("static", initial_batch=_positive_batch(global_batch))
        self.balancer = balancer if isinstance(balancer, Balancer) else \
            build_balancer(balancer, self.world_size, **(balancer_options or {}))
        if self.balancer.world_size != self.world_size:
            raise ValueError(f"the balancer splits over {self.balancer.world_size} ranks, the job has "
                             f"{self.world_size}")
        self.dataset, self.seed, self.lr_scaling = dataset, seed, lr_scaling
        self.slowdown, self.emulation = slowdown, emulation
        if device is None:   # where the decisions and measurements travel: NCCL moves CUDA tensors only
            nccl = distributed and dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)
        self.sampler = DynamicBatchSampler(len(dataset), rank=self.rank, world_size=self.world_size, seed=seed,
                                           shuffle=shuffle, require_plans=True)
        # The loader's own generator seeds its workers: iter() then leaves the default RNG alone, so a resumed run
        # draws exactly what the uninterrupted one drew.
        loader_options.setdefault("generator", torch.Generator())
        self.loader = planned_loader(dataset, self.sampler, **loader_options)
        self.decisions = RunDecisions(self.schedule, self.balancer,
                                      lookahead=prefetch_depth(self.loader) + extra_lookahead,
                                      decide=self._decided_by_rank0)
        self.model = self.clock = self.optimizer = None
        self.initial_lrs: list[float] = []
        self.global_step = 0
        self.trained_plan: StepPlan | None = None   # the last step trained (the sampler may have run ahead)
        self.pending: Step | None = None            # the step handed out and not yet measured
        self.epoch_loss_sum, self.epoch_samples, self.epoch_elapsed_s = 0.0, 0, 0.0
        self.segment_started = time.perf_counter()
        self.replanned: dict[int, int] = {}   # {step: B} planned on another number of ranks, to split anew

    @property
    def lookahead(self) -> int:
        return self.decisions.lookahead

    @property
    def history(self):
        """The finished epochs' summaries (global batch, mean train loss, seconds), oldest first."""
        return self.decisions.history

    def _decided_by_rank0(self, choose, count: int, integers: bool) -> list:
        return decided_by_rank0(choose, count, device=self.device, integers=integers)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> torch.nn.Module:
        """The model to train: an FSDP2 model (fully_shard already applied) gets the summing contract on every
        FSDPModule; any other model is wrapped in stock DDP with a summing, timing comm hook. With `optimizer`,
        its LR follows the global batch (lr_scaling) and the schedule's factor."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DynamicBatches.prepare needs torch.distributed initialised first "
                               "(dist.init_process_group; one process is a group of one)")
        # a model passed through fully_shard has imported torch's FSDP; otherwise skip its ~1.4 s import
        if "torch.distributed.fsdp" in sys.modules and _is_fsdp(model):
            from .fsdp import prepare_fsdp
            self.clock = prepare_fsdp(model)
            self.model = model
        else:
            from .ddp_step import wrap_ddp
            self.model = wrap_ddp(model, self.device)
            self.clock = self.model.clock
        if optimizer is not None:
            self.optimizer, self.initial_lrs = optimizer, [group["lr"] for group in optimizer.param_groups]
        return self.model

    # --- a user's loop: epoch() -----------------------------------------------------------------------------------

    @property
    def resume_epoch(self) -> int:
        """The epoch a loop starts or continues with: 0 at first; after load_state_dict the saved one, or the next
        when the saved state had finished its epoch. `for epoch in range(batches.resume_epoch, epochs)`."""
        if self.trained_plan is None:   # nothing trained since construction or load: the sampler's own position
            return self.sampler.epoch + (1 if self.sampler.remaining == 0 else 0)
        return self.trained_plan.epoch + (1 if self.remaining_after(self.trained_plan) == 0 else 0)

    def epoch(self, epoch: int):
        """The epoch's (batch, Step) pairs; measuring, observing and planning happen between them, and the epoch
        ends (balancer, schedule history) with its last step."""
        self.begin_epoch(epoch)
        self.segment_started = time.perf_counter()
        loader = iter(self.loader)
        while True:
            self._finish_pending()   # before the loader reads on: it asks for the step planned just now
            try:
                batch, plan = next(loader)
            except StopIteration:
                return
            step = self.pending = Step(self, plan)
            self._set_lr(plan.global_batch)
            if self.clock is not None:
                self.clock.start(batch=len(plan), slowdown=self.slowdown, emulation=self.emulation)
            step.started = time.perf_counter()
            yield batch, step

    def _finish_pending(self) -> None:
        """Exchange the measurements of the step handed out last (its backward and optimizer step are done); after
        the epoch's last step, end the epoch."""
        step, self.pending = self.pending, None
        if step is None:
            return
        if self.clock is None:
            raise RuntimeError("DynamicBatches.epoch() measures each step through the model's clock: call "
                               "prepare(model) before training")
        if hasattr(self.clock, "stop"):   # FSDP2: a no-op once the step's last reduce-scatter stopped it
            self.clock.stop()
        step_s = time.perf_counter() - step.started
        local_sq = float(self.clock.local_sq) if self.clock.measure_noise else 0.0
        compute, batches, loss_sums, _ = exchange_step_stats(
            self.clock.compute_s, step.batch, step.loss_sum(), local_sq, rank=self.rank,
            world_size=self.world_size, device=self.device)
        self.trained(step.plan, compute, batches, loss_sums=loss_sums, overhead_s=max(0.0, step_s - max(compute)))
        self.end_epoch_if_last(step.plan)

    def end_epoch_if_last(self, plan: StepPlan) -> None:
        """After trained(plan): if plan was the epoch's last step, end the epoch with its summary (the mean train
        loss, the slowest rank's seconds); a collective when it ends, so every rank calls it after every step."""
        if self.remaining_after(plan) != 0:
            return
        now = time.perf_counter()
        self.epoch_elapsed_s += now - self.segment_started
        self.segment_started = now
        epoch_s = max_over_ranks(self.epoch_elapsed_s, device=self.device)   # the slowest rank's
        self.end_epoch(EpochSummary(plan.epoch, self.decisions.batch,
                                    self.epoch_loss_sum / max(1, self.epoch_samples), epoch_s))

    def _set_lr(self, global_batch: int) -> None:
        if self.optimizer is None:
            return
        factor = self.decisions.decision.lr_factor
        for group, initial in zip(self.optimizer.param_groups, self.initial_lrs):
            group["lr"] = scaled_lr(initial, global_batch, self.schedule.clamp(self.schedule.initial_batch),
                                    self.lr_scaling) * factor

    # --- the protocol the engine drives (epoch() is built from it) -------------------------------------------------

    def begin_epoch(self, epoch: int):
        """Position the sampler (a resumed run keeps its mid-epoch position), decide the epoch's B, plan its first
        steps, check that every rank agrees, seed the loader's workers. Returns the schedule's decision."""
        if self.pending is not None:   # the previous epoch was left early (a break): finish its last step
            self._finish_pending()
        if epoch != self.sampler.epoch or self.sampler.remaining == 0:
            self.epoch_loss_sum, self.epoch_samples, self.epoch_elapsed_s = 0.0, 0, 0.0
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        decision, plans = self.decisions.start_epoch(epoch, next_step=self.sampler.steps_in_epoch,
                                                     planned=list(self.sampler.plans), replanned=self.replanned)
        self.replanned = {}
        for step, split in plans.items():
            self.sampler.plan_step(step, split)
        # The guard: a disagreement would otherwise surface as a hang in some later collective, and another sample
        # order (a node with another torch build) as a silent loss of every-sample-once.
        check_ranks_agree({"global batch": decision.global_batch, "split": self.sampler.requested_batches(),
                           "step": self.global_step, "sample order": self.sampler.order_fingerprint()},
                          where=f"at the start of epoch {epoch + 1}")
        self.seed_loader(epoch)
        return decision

    def seed_loader(self, epoch: int) -> None:
        """Seed the loader's workers for `epoch` (each iter() of the loader draws its worker seeds from it)."""
        self.loader.generator.manual_seed(rank_seed(self.seed, self.rank) + epoch)

    def trained(self, plan: StepPlan, compute_s: Sequence[float], rank_batches: Sequence[int], *,
                loss_sums: Sequence[float] | None = None, overhead_s: float = 0.0,
                global_step: int | None = None, samples: int | None = None) -> None:
        """Step `plan` was trained with these exchanged measurements (the same on every rank): observe them and
        plan the step lookahead + 1 ahead. global_step: the caller's count (default: this object's); samples:
        every rank's samples of the update when it spans more steps than `plan` (gradient accumulation)."""
        self.trained_plan = plan
        plans = self.decisions.step_trained(plan.step, self.global_step if global_step is None else global_step,
                                            compute_s, rank_batches, overhead_s=overhead_s)
        for step, split in plans.items():
            self.sampler.plan_step(step, split)
        self.global_step += 1
        self.epoch_samples += plan.global_batch if samples is None else samples
        self.epoch_loss_sum += sum(loss_sums) if loss_sums is not None else 0.0

    def end_epoch(self, summary: EpochSummary | None) -> None:
        """After the epoch's last step: None when the run stopped inside the epoch (it stays current)."""
        self.decisions.end_epoch(summary)

    def load_sampler_state(self, state: dict) -> None:
        """The sampler's position; steps it had planned on another number of ranks keep their global batch (a
        schedule's decision) and are split anew over this job's ranks when the epoch begins."""
        self.sampler.load_state_dict(state)
        if len(state["rank_batches"]) != self.world_size:
            self.replanned = {int(step): sum(split) for step, split in state.get("plans", [])}

    def remaining_after(self, plan: StepPlan | None) -> int:
        """Samples of the epoch after the trained step `plan` (the sampler itself may have run ahead of it)."""
        if plan is None or plan.epoch != self.sampler.epoch:
            return self.sampler.remaining
        return len(self.dataset) - plan.offset - plan.global_batch

    # --- exact resume ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the run stands, on any rank alike: the sampler after the last trained step (with the plans of the
        steps the loader already read), the balancer, the schedule, the decisions and this epoch's counters."""
        self._finish_pending()
        now = time.perf_counter()
        self.epoch_elapsed_s += now - self.segment_started   # this epoch's seconds so far
        self.segment_started = now
        return {"sampler": self.sampler.state_dict(trained=self.trained_plan),
                "balancer": self.balancer.state_dict(), "schedule": self.schedule.state_dict(),
                "decisions": self.decisions.state_dict(), "global_step": self.global_step,
                "epoch_loss_sum": self.epoch_loss_sum, "epoch_samples": self.epoch_samples,
                "epoch_elapsed_s": self.epoch_elapsed_s}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` was taken, on this job's ranks. Another world size keeps the position, the
        history and the schedule; the balancer starts over from the equal split (old ranks are not new ranks)."""
        same_size = state["balancer"]["world_size"] == self.world_size
        self.load_sampler_state(state["sampler"])
        if same_size:
            self.balancer.load_state_dict(state["balancer"])
        self.schedule.load_state_dict(state["schedule"], bounds_may_change=not same_size)
        self.decisions.load_state_dict(state["decisions"])
        self.global_step = state["global_step"]
        self.epoch_loss_sum, self.epoch_samples = state["epoch_loss_sum"], state["epoch_samples"]
        self.epoch_elapsed_s = state["epoch_elapsed_s"]
        self.trained_plan, self.pending = None, None


class Step:
    """One step of a user's loop: this rank's slice of `plan` and how to scale its loss."""

    def __init__(self, owner: DynamicBatches, plan: StepPlan):
        self.owner, self.plan = owner, plan
        self.rank_batches: list[int] = plan.rank_batches    # every rank's samples in this step
        self.global_batch: int = plan.global_batch
        self.batch: int = len(plan)                         # this rank's
        self.epoch, self.index = plan.epoch, plan.step      # index: the step within its epoch
        self.offset: int = plan.offset                      # samples of the epoch's order before this step
        self.started = 0.0
        self._loss_sum: torch.Tensor | float = 0.0         # this rank's summed loss, for the exchange

    @property
    def share(self) -> float:
        return self.batch / self.global_batch

    def _record(self, summed: torch.Tensor) -> None:
        self._loss_sum = self._loss_sum + summed.detach().float()

    def loss_sum(self) -> float:
        return float(self._loss_sum)

    def scale(self, mean_loss: torch.Tensor, *, samples: int | None = None) -> torch.Tensor:
        """A loss averaged over this rank's `samples` (default: its slice), as the union batch's mean wants it."""
        samples = self.batch if samples is None else samples
        if samples == 0:   # a mean over no samples is NaN in value; its gradient is 0 and still reaches every rank
            return mean_loss.nan_to_num(0.0) * 0.0
        self._record(mean_loss * samples)
        return mean_loss * (samples / self.global_batch)

    def scale_sum(self, summed_loss: torch.Tensor) -> torch.Tensor:
        """A loss summed over this rank's samples, divided by the global batch."""
        self._record(summed_loss)
        return summed_loss / self.global_batch

    def scale_weighted(self, summed_loss: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
        """A loss summed over weighted items (tokens), divided by the weight summed over every rank (one
        all-reduce): the union batch's weighted mean. The logged loss stays per sample."""
        total = torch.as_tensor(weight, dtype=torch.float64, device=summed_loss.device).clone()
        if self.owner.world_size > 1:
            dist.all_reduce(total)
        self._record(summed_loss * (self.global_batch / total.clamp_min(1e-300)).to(summed_loss.dtype))
        return summed_loss / total.to(summed_loss.dtype).clamp_min(torch.finfo(summed_loss.dtype).tiny)

    def micro_batches(self, batch, size: int):
        """The slice in chunks of at most `size` samples, as many on every rank (empty ones pad); the gradient
        reduction waits for the last (DDP's no_sync, FSDP2's set_requires_gradient_sync(False) before it)."""
        if size < 1:
            raise ValueError(f"micro-batch size must be >= 1, got {size}")
        count = micro_batch_count(max(self.rank_batches), size)
        chunks = [_take(batch, start, min(start + size, self.batch)) for start in range(0, self.batch, size)]
        chunks += [empty_like_batch(batch)] * (count - len(chunks))
        for index, chunk in enumerate(chunks):
            held = contextlib.nullcontext() if index == count - 1 else _no_gradient_sync(self.owner.model)
            with held:
                yield MicroBatch(self, chunk, samples=_length(chunk))


@dataclasses.dataclass
class MicroBatch:
    step: Step
    data: object
    samples: int

    def scale(self, mean_loss: torch.Tensor) -> torch.Tensor:
        return self.step.scale(mean_loss, samples=self.samples)


def _take(batch, start: int, stop: int):
    """Samples [start, stop) of a collated batch (tensors, and dicts, tuples and lists of them)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return type(batch)({key: _take(value, start, stop) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_take(value, start, stop) for value in batch))
    if isinstance(batch, (tuple, list)):
        nested = any(isinstance(value, (torch.Tensor, dict, list, tuple)) for value in batch)
        return type(batch)(_take(value, start, stop) for value in batch) if nested else batch[start:stop]
    return batch


def _length(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    values = batch.values() if isinstance(batch, dict) else batch
    return next((_length(value) for value in values if isinstance(value, (torch.Tensor, dict, list, tuple))),
                len(batch))


@contextlib.contextmanager
def _no_gradient_sync(model):
    if model is None:
        yield
    elif hasattr(model, "no_sync"):   # DDP
        with model.no_sync():
            yield
    else:                             # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def _is_fsdp(model) -> bool:
    from .fsdp import is_fsdp
    return is_fsdp(model)


def _positive_batch(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"global_batch must be an int >= 1 or a Schedule, got {value!r}")
    return value
