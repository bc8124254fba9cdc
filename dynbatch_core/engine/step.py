"""The training step on uneven per-rank batches, exact with respect to one step on the union batch.

    sync = GradientSync(model.parameters(), world_size=2)
    result = train_step(model, optimizer, images, labels, global_batch=16, rank=rank, sync=sync)

Why it is exact: rank i's loss is sum_j loss(x_ij) / B (B = the global batch, not b_i), and gradients are *summed*
over ranks, so the update equals that of one process holding all B samples, whatever the split. (Averaging per rank
and then over ranks, as plain DDP does, weights a sample of a 3-sample rank 13/3 times more than one of a 13-sample
rank.) This holds up to float summation order for models without batch statistics (--norm none or group); batch
norm normalises each rank's slice (and each micro-batch) with its own statistics, so a split or --max-micro-batch
changes the result unless SyncBatchNorm is used (CUDA only, and then without micro-batches: SyncBN normalises each
micro-batch over "chunk j of every rank", not over the union batch).

Why an explicit all-reduce instead of DDP: DDP all-reduces inside backward(), so a timer around backward() includes
waiting for the slowest rank. Here each rank's compute time (forward + backward + the emulated slowdown) is measured
before the all-reduce, which is what the balancers must see. A rank whose slice is empty (the short last step of an
epoch) still runs forward and backward on its empty batch and contributes zeros. The per-rank measurements ride along in the same all-reduce, so every rank learns
every rank's compute time and batch size without another collective. benchmarks/overhead.py compares the throughput
with plain DDP.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .emulation import Emulation, take_emulated_delay
from ..batching.noise_scale import step_points


def uneven_batch_loss(logits: torch.Tensor, labels: torch.Tensor, global_batch: int) -> torch.Tensor:
    """This rank's share of the global mean loss: sum over its samples divided by the global batch."""
    return F.cross_entropy(logits, labels, reduction="sum") / global_batch


class GradientSync:
    """Sums gradients over all ranks in flat buckets (one all-reduce per bucket, all in flight together). A bucket
    holds parameters of one dtype and device only (a float32 gradient summed in a bfloat16 bucket would lose
    precision); a gradient that is None on every rank stays None (an unused parameter is then left alone by
    momentum and weight decay, as in one process)."""

    def __init__(self, parameters, *, world_size: int, bucket_mb: float = 25.0):
        self.world_size = world_size
        self.params = [p for p in parameters if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] = []
        open_buckets: dict[tuple, list[torch.nn.Parameter]] = {}   # (dtype, device) -> the bucket being filled
        bucket_bytes: dict[tuple, int] = {}
        for param in self.params:
            kind, size = (param.dtype, param.device), param.numel() * param.element_size()
            if kind not in open_buckets or bucket_bytes[kind] + size > bucket_mb * 2**20:
                open_buckets[kind], bucket_bytes[kind] = [], 0
                self.buckets.append(open_buckets[kind])
            open_buckets[kind].append(param)
            bucket_bytes[kind] += size
        self.buffers = [torch.zeros(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
                        for bucket in self.buckets]

    def all_reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum every gradient and `stats` over ranks; returns the summed stats."""
        if self.world_size == 1:
            return stats
        device = self.params[0].device if self.params else stats.device
        holders = torch.tensor([float(param.grad is not None) for param in self.params], device=device)
        works = [dist.all_reduce(stats, async_op=True), dist.all_reduce(holders, async_op=True)]
        for bucket, buffer in zip(self.buckets, self.buffers):
            offset = 0
            for param in bucket:
                chunk = buffer[offset:offset + param.numel()]
                if param.grad is None:
                    chunk.zero_()
                else:
                    chunk.copy_(param.grad.reshape(-1))
                offset += param.numel()
            works.append(dist.all_reduce(buffer, async_op=True))
        for work in works:
            work.wait()
        unused = {id(param) for param, count in zip(self.params, holders.tolist()) if count == 0}
        for bucket, buffer in zip(self.buckets, self.buffers):
            offset = 0
            for param in bucket:
                summed = buffer[offset:offset + param.numel()].view_as(param)
                if id(param) in unused:
                    pass   # no rank's loss reached it: None, as in one process
                elif param.grad is None:
                    param.grad = summed.clone()
                else:
                    param.grad.copy_(summed)
                offset += param.numel()
        return stats


@dataclass(frozen=True)
class StepResult:
    compute_s: list[float]   # per rank: forward + backward + emulated delay, without waiting
    rank_batches: list[int]  # per rank: samples in this step
    loss_sums: list[float]   # per rank: summed loss over its samples
    wait_s: float            # this rank: seconds in the all-reduce (communication + waiting for others)
    # With StepOptions.measure_noise (noise_scale.py): (batch, squared norm of its mean gradient) for every rank
    # with samples (at one rank: the step's first half) and, last, for the whole step; else None.
    noise_points: list[tuple[int, float]] | None = None

    @property
    def global_batch(self) -> int:
        return sum(self.rank_batches)

    @property
    def loss(self) -> float:
        return sum(self.loss_sums) / max(1, self.global_batch)


@dataclass(frozen=True)
class StepOptions:
    """What a user's training loop expects, kept exact (both gradient paths take it)."""
    clip_grad_norm: float | None = None          # clip the *global* gradient (after the reduction) to this norm
    autocast_dtype: torch.dtype | None = None    # mixed precision: forward under torch.autocast with this dtype
    scaler: torch.amp.GradScaler | None = None   # float16: loss scaling (its decisions follow the global gradient)
    max_micro_batch: int | None = None           # a larger slice runs as micro-batches, gradients accumulated
    measure_noise: bool = False                  # squared gradient norms for the noise scale (noise_scale.py)


def micro_batch_count(largest_slice: int, max_micro_batch: int | None) -> int:
    """Forward/backward calls each rank makes in a step: ceil(max_j b_j / m), the same on every rank (at least 1).

    A collective inside the model (SyncBatchNorm's all-gather and all-reduce, FSDP's per-layer gathers) pairs the
    i-th call of every rank: a rank that ran fewer micro-batches than its peers would pair their collectives with
    its gradient reduction (a hang, or garbage). So ranks with fewer samples pad with empty micro-batches."""
    if max_micro_batch is None:
        return 1
    return max(1, -(-largest_slice // max_micro_batch))


def micro_batches(images: torch.Tensor, labels: torch.Tensor, size: int | None, count: int | None = None):
    """The slice in chunks of at most `size` samples (one chunk, possibly empty, when size is None or larger),
    padded with empty chunks to `count` chunks when given (micro_batch_count)."""
    chunks = [(images, labels)] if size is None or len(labels) <= size else \
        list(zip(images.split(size), labels.split(size)))
    if count is not None:
        if count < len(chunks):
            raise ValueError(f"{len(labels)} samples in chunks of {size} need {len(chunks)} micro-batches, more than "
                             f"the {count} every rank runs")
        chunks += [(images[:0], labels[:0])] * (count - len(chunks))
    return chunks


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training
               for module in model.modules())


def first_half_point(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, global_batch: int,
                     options: StepOptions) -> tuple[int, float]:
    """(samples, squared norm of the first half's gradient) from a side pass that leaves no trace: gradients by
    torch.autograd.grad (nothing accumulates, no DDP hook fires), buffers and RNG restored. Under batch norm the
    halves cannot be the step itself (each would be normalised on its own and update the running statistics
    twice); this costs half a step more instead."""
    half = len(labels) // 2
    if half == 0:
        return 0, 0.0
    bare = getattr(model, "module", model)   # the model inside DDP
    params = [param for param in bare.parameters() if param.requires_grad]
    buffers = [buffer.detach().clone() for buffer in bare.buffers()]
    summed = [torch.zeros_like(param) for param in params]
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for chunk_images, chunk_labels in micro_batches(images[:half], labels[:half], options.max_micro_batch):
            loss = chunk_loss(bare, chunk_images, chunk_labels, global_batch, options)
            scaled = options.scaler.scale(loss) if options.scaler is not None else loss
            for total, grad in zip(summed, torch.autograd.grad(scaled, params, allow_unused=True)):
                if grad is not None:
                    total += grad
    with torch.no_grad():
        for buffer, saved in zip(bare.buffers(), buffers):
            buffer.copy_(saved)
    return half, squared_norm(summed, options)


def chunk_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, global_batch: int,
               options: StepOptions) -> torch.Tensor:
    """One micro-batch's share of the global mean loss, its forward under the step's autocast."""
    with torch.autocast(images.device.type, dtype=options.autocast_dtype, enabled=options.autocast_dtype is not None):
        logits = model(images)
    return uneven_batch_loss(logits.float(), labels, global_batch)


def forward_backward(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, global_batch: int,
                     options: StepOptions, no_sync=None, first_half: list | None = None,
                     largest_slice: int | None = None) -> float:
    """Forward and backward over the slice (in micro-batches), each chunk's loss summed / global_batch; returns the
    slice's summed loss. `no_sync`: a context manager (DDP's) that holds the reduction back on all but the last chunk.
    `first_half`: append (samples, squared gradient norm of the slice's first half): a second batch size for the
    noise scale when one rank holds the whole step. Without batch norm the slice then runs as its two halves (the
    update is unchanged); with it, a side pass measures the half (first_half_point). `largest_slice`: the largest
    slice of any rank in this step, so that every rank runs micro_batch_count(largest_slice) micro-batches.

    Every rank runs forward and backward, even on an empty slice (the short last step of an epoch): a collective
    inside the model (SyncBatchNorm, DDP's reducer) would otherwise wait for a rank that never comes. An empty
    slice's loss is an empty sum, 0, so it contributes zero gradients.
    """
    if first_half is not None and has_batch_norm(model):
        first_half.append(first_half_point(model, images, labels, global_batch, options))
        first_half = None
    count = None if largest_slice is None else micro_batch_count(largest_slice, options.max_micro_batch)
    halves = [(images, labels)] if first_half is None else \
        [(images[:len(labels) // 2], labels[:len(labels) // 2]), (images[len(labels) // 2:], labels[len(labels) // 2:])]
    chunks = [(chunk, half) for half, (half_images, half_labels) in enumerate(halves)
              for chunk in micro_batches(half_images, half_labels, options.max_micro_batch,
                                         count if first_half is None else None)]
    loss_sum = 0.0
    for index, ((chunk_images, chunk_labels), half) in enumerate(chunks):
        hold = no_sync() if no_sync is not None and index < len(chunks) - 1 else contextlib.nullcontext()
        with hold:
            loss = chunk_loss(model, chunk_images, chunk_labels, global_batch, options)
            (options.scaler.scale(loss) if options.scaler is not None else loss).backward()
        loss_sum += loss.item() * global_batch
        if first_half is not None and half == 0 and (index + 1 == len(chunks) or chunks[index + 1][1] == 1):
            first_half.append((len(halves[0][1]), squared_grad_norm(model, options)))   # the halves: one rank only
    return loss_sum


def squared_grad_norm(model: torch.nn.Module, options: StepOptions) -> float:
    """|gradient|^2 over the model's parameters (float16 loss scaling undone), in float64."""
    return squared_norm([param.grad for param in model.parameters() if param.grad is not None], options)


def squared_norm(gradients: list[torch.Tensor], options: StepOptions) -> float:
    """|gradients|^2 in float64, float16 loss scaling undone."""
    squares = [grad.detach().double().pow(2).sum() for grad in gradients]
    total = float(torch.stack(squares).sum()) if squares else 0.0   # one device sync, not one per parameter
    scale = options.scaler.get_scale() if options.scaler is not None else 1.0
    return total / scale ** 2


def noise_points(local_sq: list[float], batches: list[int], global_sq: float,
                 first_half: list | None) -> list[tuple[int, float]]:
    """The step's (batch, squared mean-gradient norm) points: every rank's, or at one rank the first half's."""
    if first_half is not None:
        samples, norm = first_half[0] if first_half else (0, 0.0)
        return step_points([norm], [samples], sum(batches), global_sq)
    return step_points(local_sq, batches, sum(batches), global_sq)


def exchange_step_stats(compute_s: float, batch: int, loss_sum: float, local_sq: float, *, rank: int,
                        world_size: int, device: torch.device | str, all_reduce=None
                        ) -> tuple[list[float], list[int], list[float], list[float]]:
    """Every rank's (compute seconds, batch, summed loss, squared norm of its own gradient) of this step, on every
    rank, in one all-reduce of a 4 x world_size float64 tensor. all_reduce(tensor) -> tensor: default
    torch.distributed's in place (GradientSync.all_reduce also sums the gradients in the same round)."""
    stats = torch.zeros(4, world_size, dtype=torch.float64, device=device)
    stats[:, rank] = torch.tensor([compute_s, float(batch), loss_sum, local_sq], dtype=torch.float64)
    if all_reduce is None:
        dist.all_reduce(stats)
    else:
        stats = all_reduce(stats)
    compute, batches, loss_sums, local_sqs = stats.cpu().tolist()
    return compute, [int(round(b)) for b in batches], loss_sums, local_sqs


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, options: StepOptions) -> None:
    """After the reduction: unscale (float16), clip the global gradient, step. Every rank holds the same summed
    gradient here, so every rank clips, skips or steps alike."""
    if options.scaler is not None:
        options.scaler.unscale_(optimizer)
    if options.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
    if options.scaler is not None:
        options.scaler.step(optimizer)
        options.scaler.update()
    else:
        optimizer.step()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, *, global_batch: int, rank: int, sync: GradientSync,
               slowdown: float = 1.0, emulation: Emulation | None = None,
               options: StepOptions = StepOptions(), largest_slice: int | None = None) -> StepResult:
    """One exact step: local forward/backward, emulated slowdown, gradient all-reduce, optimizer step.

    `slowdown` k makes this rank sleep (k - 1) times its own measured compute time; with `emulation` the rank
    instead takes exactly its emulated cost (emulation.take_emulated_delay).
    `largest_slice`: max over ranks of this step's slices (the plan's), so that every rank runs as many micro-batches
    (micro_batch_count); None: this rank's own, which is safe only without collectives inside the model.
    """
    world_size = sync.world_size
    optimizer.zero_grad(set_to_none=True)
    first_half = [] if options.measure_noise and world_size == 1 else None
    started = time.perf_counter()
    loss_sum = forward_backward(model, images, labels, global_batch, options, first_half=first_half,
                                largest_slice=largest_slice)
    compute_s = time.perf_counter() - started
    compute_s = take_emulated_delay(compute_s, len(labels), slowdown, emulation)
    local_sq = squared_grad_norm(model, options) if options.measure_noise else 0.0
    waited_from = time.perf_counter()
    compute, batches, loss_sums, local_sqs = exchange_step_stats(
        compute_s, len(labels), loss_sum, local_sq, rank=rank, world_size=world_size, device=images.device,
        all_reduce=sync.all_reduce)
    wait_s = time.perf_counter() - waited_from
    points = noise_points(local_sqs, batches, squared_grad_norm(model, options), first_half) \
        if options.measure_noise else None   # before the optimizer step, which may clip the gradient
    optimizer_step(model, optimizer, options)
    return StepResult(compute, batches, loss_sums, wait_s, points)
