"""The exact uneven-batch step on stock DistributedDataParallel: overlap kept, compute timed at bucket readiness.

    model = wrap_ddp(model, device)                 # DDP, broadcast_buffers=False, a summing comm hook
    result = ddp_train_step(model, optimizer, images, labels, global_batch=16, rank=rank)   # a step.StepResult

Why it is exact: as in step.py, rank i's loss is its summed loss divided by the global B; the comm hook all-reduces
each gradient bucket as a sum (DDP's default hook would divide by the world size), so the update equals one step on
the union batch for any split, an empty slice included (an empty batch still runs forward and backward, so DDP's
reducer sees every rank).

Compute time without waiting: DDP all-reduces inside backward(), so a clock around backward() would include
waiting for slower ranks. The hook sees every bucket as its gradients become ready; when the last bucket is ready,
this rank's forward and backward are done: compute_s is measured then (on CUDA from events recorded in the stream).
The emulated slowdown sleeps in that same moment, before the last bucket's all-reduce, so other ranks wait for it
exactly as they would for a slower device. Per-rank (compute_s, batch, loss) then travel in one small all-reduce.

Batch-norm buffers are not broadcast from rank 0 at every forward (broadcast_buffers=False, or its successor
forward_sync_buffers=False): each rank keeps its own running statistics, averaged by the engine before evaluation
(evaluation.average_buffers). DDP's constructor still broadcasts rank 0's parameters and buffers once (torch 2.14
does so even with forward_sync_buffers=False): wrap the model before loading per-rank buffers, as the engine does.

Not with compiled autograd's Python reducer (torch._dynamo.config.optimize_ddp = "python_reducer"): DDP then calls
comm hooks per parameter with a (grad, param) tuple and ignores what they return, so there is no bucket to sum and
no last bucket to stop the clock at; wrap_ddp refuses it. torch.compile's default DDPOptimizer mode keeps the C++
reducer and works.
"""
from __future__ import annotations

import inspect
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .emulation import Emulation, take_emulated_delay
from .timing import DeviceTimer
from .step import (StepOptions, StepResult, exchange_step_stats, forward_backward, noise_points, optimizer_step,
                   squared_grad_norm)


class BucketClock:
    """Comm-hook state: when this step started, when its last gradient bucket became ready, the emulated delay."""

    def __init__(self, device: torch.device):
        self.device = device
        self.timer = DeviceTimer(device)
        self.compute_s = 0.0
        self.batch = 0
        self.slowdown = 1.0
        self.emulation: Emulation | None = None       # see emulation.take_emulated_delay
        self.buckets = 0                              # gradient buckets seen in the current step
        self.local_sq = torch.zeros((), dtype=torch.float64, device=device)   # |this rank's gradient|^2, or 0
        self.measure_noise = False

    def start(self, *, batch: int = 0, slowdown: float = 1.0, emulation: Emulation | None = None) -> None:
        """Call at the start of every step, before forward (batch: this rank's samples, for the emulation)."""
        self.batch, self.slowdown, self.compute_s, self.buckets = batch, slowdown, 0.0, 0
        self.local_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        self.emulation = emulation
        self.timer.start()

    @property
    def started(self) -> float:
        return self.timer.started

    def elapsed_s(self) -> float:
        return self.timer.elapsed_s()

    def last_bucket_ready(self) -> None:
        """Measure this rank's compute time and take the emulated delay, before the last all-reduce starts."""
        self.compute_s = take_emulated_delay(self.elapsed_s(), self.batch, self.slowdown, self.emulation)


def summing_hook(clock, bucket):  # no annotations: DDP checks them, and this module's are strings
    """All-reduce a gradient bucket (a dist.GradBucket) as a sum, not DDP's mean; at the last bucket, stop this
    rank's clock (a BucketClock) first. Returns the future of the summed buffer."""
    if isinstance(bucket, tuple):   # compiled autograd's Python reducer: (grad, param) per parameter
        raise RuntimeError(PYTHON_REDUCER_REFUSED)
    clock.buckets += 1
    if clock.measure_noise:  # this rank's own gradient, before the sum over ranks
        clock.local_sq = clock.local_sq + bucket.buffer().detach().double().pow(2).sum()
    if bucket.is_last():
        clock.last_bucket_ready()
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


PYTHON_REDUCER_REFUSED = ("dynbatch's summing comm hook needs DDP's C++ reducer, not compiled autograd's Python "
                          "reducer (torch._dynamo.config.optimize_ddp = 'python_reducer'); use torch.compile's "
                          "default 'ddp_optimizer' mode")


def wrap_ddp(model: torch.nn.Module, device: torch.device, **ddp_options) -> DistributedDataParallel:
    """`model` in stock DDP with the summing, timing hook; `model.clock` is the hook's BucketClock."""
    if _python_reducer_mode():
        raise ValueError(PYTHON_REDUCER_REFUSED)
    device_ids = [device.index] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids, **_no_buffer_broadcast(), **ddp_options)
    wrapped.clock = BucketClock(device)
    wrapped.register_comm_hook(wrapped.clock, summing_hook)
    return wrapped


def _python_reducer_mode() -> bool:
    try:
        from torch._dynamo.utils import get_optimize_ddp_mode
    except ImportError:   # a torch without dynamo
        return False
    return get_optimize_ddp_mode() == "python_reducer"


def exchange_measurements(compute_s: float, batch: int, *, device: torch.device | str = "cpu",
                          loss_sum: float = 0.0) -> tuple[list[float], list[int], list[float]]:
    """Every rank's (compute seconds, batch size, summed loss) of this step, on every rank: what balancers observe."""
    compute, batches, loss_sums, _ = exchange_step_stats(compute_s, batch, loss_sum, 0.0, rank=dist.get_rank(),
                                                         world_size=dist.get_world_size(), device=device)
    return compute, batches, loss_sums


def _no_buffer_broadcast() -> dict:
    """DDP's option to stop broadcasting rank 0's buffers at every forward (renamed in newer torch releases)."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def ddp_train_step(model: DistributedDataParallel, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                   labels: torch.Tensor, *, global_batch: int, rank: int, slowdown: float = 1.0,
                   emulation: Emulation | None = None, options: StepOptions = StepOptions(),
                   largest_slice: int | None = None) -> StepResult:
    """One exact step through DDP (see the module docstring); the arguments mean what they mean in step.train_step."""
    clock: BucketClock = model.clock
    optimizer.zero_grad(set_to_none=True)
    clock.measure_noise = options.measure_noise
    first_half = [] if options.measure_noise and dist.get_world_size() == 1 else None
    clock.start(batch=len(labels), slowdown=slowdown, emulation=emulation)
    loss_sum = forward_backward(model, images, labels, global_batch, options, no_sync=model.no_sync,
                                first_half=first_half, largest_slice=largest_slice)
    backward_done = time.perf_counter()
    scale = options.scaler.get_scale() if options.scaler is not None else 1.0
    compute, batches, loss_sums, local_sqs = exchange_step_stats(
        clock.compute_s, len(labels), loss_sum, float(clock.local_sq) / scale ** 2, rank=rank,
        world_size=dist.get_world_size(), device=images.device)
    points = noise_points(local_sqs, batches, squared_grad_norm(model, options), first_half) \
        if options.measure_noise else None   # before the optimizer step, which may clip the gradient
    optimizer_step(model, optimizer, options)
    wait_s = max(0.0, backward_done - clock.started - clock.compute_s)  # host clock: time blocked in the reduction
    return StepResult(compute, batches, loss_sums, wait_s, points)
