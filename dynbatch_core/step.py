"""The training step on uneven per-rank batches, exact with respect to one step on the union batch.

    sync = GradientSync(model.parameters(), world_size=2)
    result = train_step(model, optimizer, images, labels, global_batch=16, rank=rank, sync=sync)

Why it is exact: rank i's loss is sum_j loss(x_ij) / B (B = the global batch, not b_i), and gradients are *summed*
over ranks, so the update equals that of one process holding all B samples, whatever the split. (Averaging per rank
and then over ranks, as plain DDP does, weights a sample of a 3-sample rank 13/3 times more than one of a 13-sample
rank.) This holds up to float summation order for models without batch statistics; batch norm normalises each rank's
slice with that slice's own statistics, so a split changes the result unless SyncBatchNorm is used (CUDA only).

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

from .noise_scale import step_points


def uneven_batch_loss(logits: torch.Tensor, labels: torch.Tensor, global_batch: int) -> torch.Tensor:
    """This rank's share of the global mean loss: sum over its samples divided by the global batch."""
    return F.cross_entropy(logits, labels, reduction="sum") / global_batch


class GradientSync:
    """Sums gradients over all ranks in flat buckets (one all-reduce per bucket, all in flight together)."""

    def __init__(self, parameters, *, world_size: int, bucket_mb: float = 25.0):
        self.world_size = world_size
        self.params = [p for p in parameters if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        bucket_bytes = 0
        for param in self.params:
            size = param.numel() * param.element_size()
            if self.buckets[-1] and bucket_bytes + size > bucket_mb * 2**20:
                self.buckets.append([])
                bucket_bytes = 0
            self.buckets[-1].append(param)
            bucket_bytes += size
        self.buffers = [torch.zeros(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
                        for bucket in self.buckets]

    def all_reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum every gradient and `stats` over ranks; returns the summed stats."""
        if self.world_size == 1:
            return stats
        works = [dist.all_reduce(stats, async_op=True)]
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
        for bucket, buffer in zip(self.buckets, self.buffers):
            offset = 0
            for param in bucket:
                summed = buffer[offset:offset + param.numel()].view_as(param)
                if param.grad is None:
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


def micro_batches(images: torch.Tensor, labels: torch.Tensor, size: int | None):
    """The slice in chunks of at most `size` samples (one chunk, possibly empty, when size is None or larger)."""
    if size is None or len(labels) <= size:
        return [(images, labels)]
    return list(zip(images.split(size), labels.split(size)))


def forward_backward(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, global_batch: int,
                     options: StepOptions, no_sync=None, first_half: list | None = None) -> float:
    """Forward and backward over the slice (in micro-batches), each chunk's loss summed / global_batch; returns the
    slice's summed loss. `no_sync`: a context manager (DDP's) that holds the reduction back on all but the last chunk.
    `first_half`: run the slice as two halves and append (samples, squared gradient norm) after the first: a
    second batch size for the noise scale when one rank holds the whole step.

    Every rank runs forward and backward, even on an empty slice (the short last step of an epoch): a collective
    inside the model (SyncBatchNorm, DDP's reducer) would otherwise wait for a rank that never comes. An empty
    slice's loss is an empty sum, 0, so it contributes zero gradients.
    """
    halves = [(images, labels)] if first_half is None else \
        [(images[:len(labels) // 2], labels[:len(labels) // 2]), (images[len(labels) // 2:], labels[len(labels) // 2:])]
    chunks = [(chunk, half) for half, (half_images, half_labels) in enumerate(halves)
              for chunk in micro_batches(half_images, half_labels, options.max_micro_batch)]
    loss_sum = 0.0
    for index, ((chunk_images, chunk_labels), half) in enumerate(chunks):
        hold = no_sync() if no_sync is not None and index < len(chunks) - 1 else contextlib.nullcontext()
        with hold:
            with torch.autocast(images.device.type, dtype=options.autocast_dtype,
                                enabled=options.autocast_dtype is not None):
                logits = model(chunk_images)
            loss = uneven_batch_loss(logits.float(), chunk_labels, global_batch)
            (options.scaler.scale(loss) if options.scaler is not None else loss).backward()
        loss_sum += loss.item() * global_batch
        if first_half is not None and half == 0 and (index + 1 == len(chunks) or chunks[index + 1][1] == 1):
            first_half.append((len(halves[0][1]), squared_grad_norm(model, options)))
    return loss_sum


def squared_grad_norm(model: torch.nn.Module, options: StepOptions) -> float:
    """|gradient|^2 over the model's parameters (float16 loss scaling undone), in float64."""
    squares = [param.grad.detach().double().pow(2).sum() for param in model.parameters() if param.grad is not None]
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


def take_emulated_delay(compute_s: float, batch: int, slowdown: float, emulated_sample_s: float | None,
                        emulated_step_s: float = 0.0, emulated_sleep: bool = True) -> float:
    """Sleep so that this rank looks `slowdown` times slower (or takes exactly the emulated cost); returns the
    compute seconds to report. Call it when forward and backward are done, before the reduction.
    emulated_sleep=False (--emulated-clock): report the emulated cost without waiting for it."""
    if emulated_sample_s is not None:
        target_s = (emulated_step_s + batch * emulated_sample_s) * slowdown
        if emulated_sleep:
            time.sleep(max(0.0, target_s - compute_s))
        return target_s
    if slowdown > 1.0:
        # The delay is this rank's own compute times (k - 1): it scales with its batch and never includes waiting.
        time.sleep((slowdown - 1.0) * compute_s)
    return compute_s * max(slowdown, 1.0)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, *, global_batch: int, rank: int, sync: GradientSync,
               slowdown: float = 1.0, emulated_sample_s: float | None = None,
               emulated_step_s: float = 0.0, emulated_sleep: bool = True,
               options: StepOptions = StepOptions()) -> StepResult:
    """One exact step: local forward/backward, emulated slowdown, gradient all-reduce, optimizer step.

    `slowdown` k makes this rank sleep (k - 1) times its own measured compute time. With `emulated_sample_s`, the
    rank instead takes exactly (emulated_step_s + b * emulated_sample_s) * k seconds (it sleeps whatever its real
    compute left over) and reports that time: balancer decisions then no longer depend on timing noise
    (reproducible experiments), and a fixed per-step cost makes the step time affine in b, as on real hardware.
    """
    world_size = sync.world_size
    optimizer.zero_grad(set_to_none=True)
    first_half = [] if options.measure_noise and world_size == 1 else None
    started = time.perf_counter()
    loss_sum = forward_backward(model, images, labels, global_batch, options, first_half=first_half)
    compute_s = time.perf_counter() - started
    compute_s = take_emulated_delay(compute_s, len(labels), slowdown, emulated_sample_s, emulated_step_s,
                                    emulated_sleep)
    local_sq = squared_grad_norm(model, options) if options.measure_noise else 0.0
    stats = torch.zeros(4, world_size, dtype=torch.float64, device=images.device)
    stats[:, rank] = torch.tensor([compute_s, float(len(labels)), loss_sum, local_sq], dtype=torch.float64)
    waited_from = time.perf_counter()
    stats = sync.all_reduce(stats)
    wait_s = time.perf_counter() - waited_from
    compute, batches, loss_sums, local_sqs = stats.cpu().tolist()
    batches = [int(round(b)) for b in batches]
    points = noise_points(local_sqs, batches, squared_grad_norm(model, options), first_half) \
        if options.measure_noise else None   # before the optimizer step, which may clip the gradient
    optimizer_step(model, optimizer, options)
    return StepResult(compute, batches, loss_sums, wait_s, points)
