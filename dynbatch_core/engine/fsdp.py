"""The exact uneven-batch step on FSDP2 (torch.distributed.fsdp.fully_shard), compute timed without waiting.

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)                              # per block, then the root
    clock = prepare_fsdp(model)                     # summing reduce-scatters, timed collectives; also model.clock
    result = fsdp_train_step(model, optimizer, images, labels, global_batch=48, rank=rank)   # a step.StepResult
    state = full_model_state(model)                 # collective; the full CPU state on rank 0, {} on the others

Why it is exact: as in step.py, rank i's loss is its summed loss divided by the global B, and the gradients must be
summed over ranks. FSDP2 reduce-scatters them as a mean by default; prepare_fsdp sets a divide factor of 1 and
forced SUM reductions on *every* FSDPModule (the factor alone makes FSDP use PREMUL_SUM, which gloo refuses; the
root alone leaves the blocks averaged). The reduction must run in float32: FSDP turns
MixedPrecisionPolicy.reduce_dtype into None when it equals param_dtype and then reduces in the gradients' dtype, so
param_dtype=torch.bfloat16 alone sums in bfloat16; prepare_fsdp refuses that (add reduce_dtype=torch.float32).
Every rank must run as many forward/backward calls (FSDP pairs each all-gather across ranks), so micro-batches
need `largest_slice`, and an empty slice still runs forward and backward.

Compute time without waiting: FSDP all-gathers parameters before each block's forward and backward, so a rank
waits for slower ranks inside those collectives, and reduce-scatters gradients inside backward. prepare_fsdp
installs its own all-gather and reduce-scatter, which run each collective synchronously and time it (on CUDA with
events on the collective's stream, the compute stream waiting for each: no overlap, so a collective's span is
exactly a stall of compute; written to this design, not yet run on a GPU). compute_s is the time from
clock.start() to the step's last reduce-scatter (the one after which every parameter group has reduced) minus the
time spent inside collectives; the emulated slowdown sleeps right then, before that reduce-scatter, so other ranks
wait for it as for a slower device. At one rank FSDP runs no collective: an all-reduce hook (which FSDP calls after
each group's reduction) stops the clock instead.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.distributed.tensor import DTensor

from .emulation import Emulation, take_emulated_delay
from .timing import DeviceTimer
from .step import StepOptions, StepResult, exchange_step_stats, forward_backward, noise_points, optimizer_step

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class FSDPClock:
    """Custom-comm state: when this step started, the seconds spent inside FSDP's collectives (communication and
    waiting for other ranks), how many parameter groups have reduced; the same interface as ddp_step.BucketClock."""

    def __init__(self, device: torch.device, param_groups: list):
        self.device = device
        self.cuda = device.type == "cuda"
        self.param_groups = param_groups              # FSDP's parameter groups, one reduce-scatter each per step
        self.compute_s = 0.0
        self.batch = 0
        self.slowdown = 1.0
        self.emulation: Emulation | None = None       # see emulation.take_emulated_delay
        self.to_reduce = 0                            # reductions in a step: groups with trainable parameters
        self.reduced = 0                              # reductions seen in the current step
        self.stopped = False                          # compute_s of this step is measured
        self.collective_s = 0.0                       # host seconds inside collectives (CPU)
        self.local_sq = torch.zeros((), dtype=torch.float64, device=device)   # |this rank's gradient|^2, or 0
        self.measure_noise = False
        self.timer = DeviceTimer(device)
        self._collective_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, *, batch: int = 0, slowdown: float = 1.0, emulation: Emulation | None = None) -> None:
        """Call at the start of every step, before forward (batch: this rank's samples, for the emulation)."""
        self.batch, self.slowdown, self.compute_s, self.emulation = batch, slowdown, 0.0, emulation
        self.reduced, self.stopped, self.collective_s, self._collective_events = 0, False, 0.0, []
        self.to_reduce = sum(any(param.sharded_param.requires_grad for param in group.fsdp_params)
                             for group in self.param_groups)
        self.local_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        self.timer.start()   # on CUDA in the compute stream

    @property
    def started(self) -> float:
        return self.timer.started

    def elapsed_s(self) -> float:
        """Seconds since start(), time inside collectives included."""
        return self.timer.elapsed_s()

    def inside_collectives_s(self) -> float:
        """Seconds inside collectives since start() (on CUDA: call after elapsed_s, which synchronizes)."""
        if self.cuda:
            return sum(begin.elapsed_time(end) for begin, end in self._collective_events) / 1000
        return self.collective_s

    def timed(self, collective) -> None:
        """Run collective() (a synchronous collective) and count its time as not computing."""
        if not self.cuda:
            begun = time.perf_counter()
            collective()
            self.collective_s += time.perf_counter() - begun
            return
        comm_stream = torch.cuda.current_stream(self.device)   # FSDP's all-gather or reduce-scatter stream
        compute_stream = self.timer.stream or torch.cuda.default_stream(self.device)
        comm_stream.wait_stream(compute_stream)    # serialised: the collective's span is a stall of compute
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(comm_stream)
        collective()
        end.record(comm_stream)
        compute_stream.wait_stream(comm_stream)
        self._collective_events.append((begin, end))

    def reducing(self, gradients: torch.Tensor) -> None:
        """A parameter group's flat local gradients are about to be reduced; at the step's last, stop the clock."""
        self.reduced += 1
        if self.measure_noise:  # this rank's own gradient, before the sum over ranks (padding is zeros)
            self.local_sq = self.local_sq + gradients.detach().double().pow(2).sum()
        if self.reduced == self.to_reduce:
            self.stop()

    def stop(self) -> None:
        """Measure this rank's compute time and take the emulated delay (once per step)."""
        if not self.stopped:
            self.stopped = True
            elapsed_s = self.elapsed_s()
            compute_s = max(0.0, elapsed_s - self.inside_collectives_s())
            # lock-step ranks (every block's all-gather): the delay ends when the step is as old as the target
            self.compute_s = take_emulated_delay(compute_s, self.batch, self.slowdown, self.emulation,
                                                 elapsed_s=elapsed_s)


class TimedAllGather(AllGather):
    """FSDP's all-gather of a parameter group, run synchronously and timed by the clock."""

    def __init__(self, clock: FSDPClock):
        self.clock = clock

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> None:
        # None even when async_op: FSDP then treats the gather as done, so no wait happens outside the clock.
        self.clock.timed(lambda: dist.all_gather_single(output_tensor, input_tensor, group=group))


class TimedReduceScatter(ReduceScatter):
    """FSDP's reduce-scatter of a parameter group's gradients (a sum, see prepare_fsdp), timed by the clock."""

    def __init__(self, clock: FSDPClock):
        self.clock = clock

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op, async_op: bool = False) -> None:
        self.clock.reducing(input_tensor)
        self.clock.timed(lambda: dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group))


def is_fsdp(model: torch.nn.Module) -> bool:
    return any(isinstance(module, FSDPModule) for module in model.modules())


def shard_per_block(model: torch.nn.Module, block_types: tuple[type, ...] | None = None,
                    **fsdp_options) -> torch.nn.Module:
    """fully_shard each block (instances of block_types; by default every module with an `expansion` attribute:
    models.py's BasicBlock and Bottleneck), then the root; returns `model`, now the FSDP root."""
    for module in list(model.modules())[1:]:
        if (isinstance(module, block_types) if block_types else hasattr(module, "expansion")) \
                and not isinstance(module, FSDPModule):
            fully_shard(module, **fsdp_options)
    return fully_shard(model, **fsdp_options)


def prepare_fsdp(model: torch.nn.Module) -> FSDPClock:
    """Give every FSDPModule of `model` (fully_shard already applied) summing float32 reductions and the timed
    collectives of one shared FSDPClock, returned and stored as `model.clock`."""
    fsdp_modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not fsdp_modules:
        raise ValueError("prepare_fsdp needs a model passed through fully_shard (each block, then the root); "
                         "no module of this one is an FSDPModule")
    params = [param for param in model.parameters() if param.requires_grad]
    _check_sharded(model, params)
    param_groups = []
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                _check_reduce_dtype(name or "the root", group)
                param_groups.append(group)
    device = params[0].device if params else torch.device("cpu")
    clock = FSDPClock(device, param_groups)
    alone = bool(params) and params[0].device_mesh.size() == 1
    for module in fsdp_modules:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
        module.set_custom_all_gather(TimedAllGather(clock))
        module.set_custom_reduce_scatter(TimedReduceScatter(clock))
        if alone:   # one rank: FSDP calls no reduce-scatter, but still this hook after each group's reduction
            module.set_all_reduce_hook(clock.reducing)
    model.clock = clock
    return clock


def _check_sharded(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Every trainable parameter is sharded by FSDP on a 1-D mesh (HSDP's replicas would be counted twice by
    sharded_squared_grad_norm); a parameter FSDP does not manage would never be reduced."""
    names = {id(param): name for name, param in model.named_parameters()}
    for param in params:
        if not isinstance(param, DTensor):
            raise ValueError(f"parameter {names[id(param)]} is not sharded by FSDP: call fully_shard on the root "
                             "module too (after its blocks)")
        if param.device_mesh.ndim != 1:
            raise ValueError(f"parameter {names[id(param)]} is on a {param.device_mesh.ndim}-D mesh; prepare_fsdp "
                             "supports plain FSDP on a 1-D mesh, not HSDP")


def _check_reduce_dtype(module_name: str, group) -> None:
    """Refuse a parameter group (an FSDPParamGroup of `module_name`) whose gradients FSDP would reduce in another
    dtype than float32. The effective dtype is FSDP's own rule: FSDPParam.init_dtype_attrs (what lazy init runs,
    idempotent) clamps reduce_dtype to None when it equals param_dtype and param_dtype to None when it equals the
    parameter's; foreach_reduce then reduces in `reduce_dtype or` the gradients' dtype (param_dtype, else the
    parameter's)."""
    for fsdp_param in group.fsdp_params:
        if not fsdp_param.sharded_param.requires_grad:
            continue
        fsdp_param.init_dtype_attrs(group.mp_policy)
        reduce_dtype = fsdp_param.reduce_dtype or fsdp_param.param_dtype or fsdp_param.orig_dtype
        if reduce_dtype != torch.float32:
            raise ValueError(f"FSDP would sum the gradients of {module_name} in {reduce_dtype}; "
                             "the exact step needs float32 reductions: give MixedPrecisionPolicy "
                             "reduce_dtype=torch.float32 (param_dtype=torch.bfloat16 alone reduces in bfloat16)")


@contextlib.contextmanager
def gradient_sync_held(model: torch.nn.Module):
    """FSDP2's no_sync: gradients accumulate unreduced until a micro-batch runs without this."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def sharded_squared_grad_norm(model: torch.nn.Module, options: StepOptions = StepOptions()) -> float:
    """|summed gradient|^2 over the sharded parameters (collective): each rank squares its own shards in float64,
    one all-reduce adds them up; float16 loss scaling undone."""
    shards = [param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
              for param in model.parameters() if param.grad is not None]
    device = shards[0].device if shards else model.clock.device
    total = torch.stack([shard.detach().double().pow(2).sum() for shard in shards]).sum() if shards else \
        torch.zeros((), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    scale = options.scaler.get_scale() if options.scaler is not None else 1.0
    return float(total) / scale ** 2


def fsdp_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                    labels: torch.Tensor, *, global_batch: int, rank: int, slowdown: float = 1.0,
                    emulation: Emulation | None = None, options: StepOptions = StepOptions(),
                    largest_slice: int | None = None) -> StepResult:
    """One exact step through FSDP2 (see the module docstring) on a model prepared by prepare_fsdp; the
    arguments mean what they mean in step.train_step."""
    clock: FSDPClock = model.clock
    world_size = dist.get_world_size()
    if options.measure_noise and world_size == 1:
        raise ValueError("the noise scale under FSDP needs at least 2 ranks (one rank has one batch size per step)")
    if options.max_micro_batch is not None and largest_slice is None:
        raise ValueError("micro-batches under FSDP need largest_slice (every rank must run as many forward and "
                         "backward calls, or FSDP's all-gathers deadlock)")
    optimizer.zero_grad(set_to_none=True)
    clock.measure_noise = options.measure_noise
    clock.start(batch=len(labels), slowdown=slowdown, emulation=emulation)
    loss_sum = forward_backward(model, images, labels, global_batch, options,
                                no_sync=lambda: gradient_sync_held(model), largest_slice=largest_slice)
    clock.stop()   # a no-op when the last reduction stopped it already
    backward_done = time.perf_counter()
    scale = options.scaler.get_scale() if options.scaler is not None else 1.0
    compute, batches, loss_sums, local_sqs = exchange_step_stats(
        clock.compute_s, len(labels), loss_sum, float(clock.local_sq) / scale ** 2, rank=rank,
        world_size=world_size, device=images.device)
    points = noise_points(local_sqs, batches, sharded_squared_grad_norm(model, options), None) \
        if options.measure_noise else None   # before the optimizer step, which may clip the gradient
    optimizer_step(model, optimizer, options)
    wait_s = max(0.0, backward_done - clock.started - clock.compute_s)  # host clock: time blocked in collectives
    return StepResult(compute, batches, loss_sums, wait_s, points)


def full_model_state(model: torch.nn.Module) -> dict:
    """The unsharded model state as CPU tensors, for a one-file checkpoint (collective: every rank calls it;
    rank 0 gets the state, the others {})."""
    return get_model_state_dict(model, options=FULL_STATE)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state (keyed by parameter name) as CPU tensors; collective, like full_model_state."""
    return get_optimizer_state_dict(model, optimizer, options=FULL_STATE)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Shard full states (from full_model_state / full_optimizer_state, on any number of ranks) into this job's
    model and optimizer; every rank passes the full dicts."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
