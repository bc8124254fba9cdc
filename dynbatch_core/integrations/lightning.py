"""Exact uneven per-rank batches under Lightning's Trainer (lightning 2.6.6): a DDPStrategy built on DynamicBatches.

    from dynbatch_core.integrations.lightning import DynamicBatchesStrategy
    strategy = DynamicBatchesStrategy(global_batch=48, balancer="pid")
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, accumulate_grad_batches=2,
                      gradient_clip_val=1.0)
    trainer.fit(model, datamodule)        # your LightningModule; train_dataloader() an ordinary DataLoader

What the strategy does, in the ranks:
- DDP with a *summing* comm hook (engine/ddp_step.py's summing_hook, which also clocks each rank's compute) and
  no buffer broadcast, on CPU and CUDA alike (Lightning registers comm hooks on CUDA only: configure_ddp below).
- The train DataLoader is rebuilt on dynbatch's planned sampler from your loader's dataset and worker options
  (num_workers, collate_fn, prefetch_factor, pin_memory, persistent_workers, ...); its batch_size, shuffle and
  sampler are not used: global_batch= and seed= decide. Lightning's DistributedSampler is not injected into it
  (the validation, test and predict loaders keep it). The loader is
  rebuilt every epoch (reload_dataloaders_every_n_epochs is set to 1) with an exact len().
- The loss your training_step returns (a tensor or {"loss": ...}, the mean over the rank's batch) is scaled so the
  summed gradient is the mean over the whole optimizer step: all accumulate_grad_batches batches of all ranks.
  A rank whose slice is empty (the epoch's short last step) does not call training_step: a zero loss over the
  parameters runs forward through DDP and backward instead, so the gradient reduction still sees every rank (so
  do not log with sync_dist=True from training_step when the epoch's last step can leave a rank empty).
- After every optimizer step, every rank's compute time and samples are exchanged and the balancer observes them
  once; rank 0 plans the splits as far ahead as the loader and Lightning's fetcher read. The epoch ends with its
  last optimizer step. gradient_clip_val clips the global gradient (every rank holds it after the summing hook).
- Logged on every optimizer step (Lightning's logger, rank 0): dynbatch/global_batch (samples of the optimizer
  step), dynbatch/rank_batch/<i> and dynbatch/compute_s/<i> for every rank i.
- Checkpoints: the callback's state holds DynamicBatches' state (sampler position and plans, balancer, schedule,
  decisions) and every rank's RNG states (torch, CUDA, numpy, random: Lightning saves none), so
  fit(ckpt_path=...) resumes exactly, also from ModelCheckpoint(every_n_train_steps=k) mid-epoch. The sampler's
  position is authoritative for which samples come next; Lightning's batch progress counts, and a disagreement
  between the two is an error.
- Validation, test and predict loops are Lightning's own (their loaders are untouched). Batch-norm statistics are
  per rank (no broadcast), as in the engine: validation on rank i uses rank i's.

Not supported (one-line errors, before ranks start where possible): manual optimization, limit_train_batches,
overfit_batches, GradientAccumulationScheduler, DDP comm hooks or model averaging of your own, broadcast_buffers,
schedules that change B inside an epoch (goodput), iterable datasets. FSDP and other non-DDP strategies: use
DynamicBatches in your own loop (README). The LR is yours: a schedule that changes B between epochs does not
rescale it here.

Relies on Lightning 2.6.6's DDPStrategy: configure_ddp wraps the module (self._ddp_kwargs) and registers comm hooks
on CUDA only; process_dataloader sees every loader after Lightning's sampler injection; training_step and
optimizer_step are the strategy's entry points of automatic optimization; a launcher's launch(trainer=...) runs
before any rank starts.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from typing import Sequence

import numpy
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from ..batching.schedules import Schedule
from ..engine.ddp_step import PYTHON_REDUCER_REFUSED, BucketClock, _no_buffer_broadcast, _python_reducer_mode, \
    summing_hook
from ..engine.emulation import Emulation
from .lightning_steps import FitBatches

REFUSED_DDP_OPTIONS = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period",
                       "broadcast_buffers", "forward_sync_buffers")


class DynamicBatchesStrategy(DDPStrategy):
    """See the module docstring. global_batch: an int or a Schedule that changes B only between epochs;
    balancer: a name (with balancer_options) or a Balancer; slowdown: one emulated factor per rank (engine/
    emulation.py), with `emulation` the emulated cost; other keywords go to DDPStrategy (start_method,
    process_group_backend, find_unused_parameters, ...)."""

    strategy_name = "dynbatch_ddp"

    def __init__(self, *, global_batch: int | Schedule, balancer="pid", balancer_options: dict | None = None,
                 seed: int = 0, shuffle: bool = True, slowdown: Sequence[float] | None = None,
                 emulation: Emulation | None = None, **ddp_options):
        refused = [name for name in REFUSED_DDP_OPTIONS if ddp_options.get(name) is not None]
        if refused:
            raise ValueError(f"DynamicBatchesStrategy registers its own summing comm hook and turns off the buffer "
                             f"broadcast: leave out {', '.join(refused)}")
        if isinstance(global_batch, Schedule) and global_batch.rule is not None:
            raise ValueError(f"DynamicBatchesStrategy needs B fixed within an epoch (Lightning reads the loader's "
                             f"length once per epoch): schedule {global_batch.name!r} changes B between steps; use "
                             "an epoch-level schedule")
        super().__init__(**ddp_options, **_no_buffer_broadcast())
        self.dynbatch_options = dict(global_batch=global_batch, balancer=balancer, balancer_options=balancer_options,
                                     seed=seed, shuffle=shuffle, emulation=emulation, lr_scaling="none")
        self.slowdown = list(slowdown) if slowdown is not None else None
        self.callback = DynamicBatchesCallback(self)
        self.fit: FitBatches | None = None       # built in the rank, from the first train loader
        self.clock: BucketClock | None = None
        self.state_to_load: dict | None = None   # the checkpoint's, until the fit is built

    # --- before the ranks start -----------------------------------------------------------------------------------

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        # an instance attribute, so the launcher keeps its type (Lightning checks it when interrupted)
        self._launcher.launch = functools.partial(_checked_launch, self, self._launcher.launch)

    def check_trainer(self, trainer, model) -> None:
        """One-line errors for what the strategy does not support; sets what it needs (loader reloads, callback)."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if model is not None and not model.automatic_optimization:
            raise ValueError("DynamicBatchesStrategy supports automatic optimization only (your LightningModule "
                             "sets automatic_optimization = False)")
        if trainer.limit_train_batches not in (1.0, None) or trainer.overfit_batches:
            raise ValueError("DynamicBatchesStrategy trains whole epochs of its sampler: leave limit_train_batches "
                             "and overfit_batches at their defaults (use max_steps to stop early)")
        if any(isinstance(callback, GradientAccumulationScheduler) for callback in trainer.callbacks):
            raise ValueError("DynamicBatchesStrategy needs a fixed accumulate_grad_batches, not a "
                             "GradientAccumulationScheduler")
        if self.slowdown is not None and len(self.slowdown) != trainer.world_size:
            raise ValueError(f"slowdown has {len(self.slowdown)} factors, the Trainer has {trainer.world_size} "
                             "ranks (one factor per rank)")
        trainer.reload_dataloaders_every_n_epochs = 1   # Lightning reads the loader's len() when it reloads
        if self.callback not in trainer.callbacks:
            trainer.callbacks.append(self.callback)

    # --- in the ranks ---------------------------------------------------------------------------------------------

    def setup(self, trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:   # before super(): configure_optimizers may load the train data
            _skip_distributed_sampler_for_training(trainer)
        super().setup(trainer)

    def configure_ddp(self) -> None:
        if _python_reducer_mode():
            raise ValueError(PYTHON_REDUCER_REFUSED)
        super().configure_ddp()   # DDP(**self._ddp_kwargs); no comm hook of Lightning's (none was given)
        self.clock = BucketClock(self.root_device)
        self.model.register_comm_hook(self.clock, summing_hook)

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if isinstance(getattr(dataloader, "sampler", None), torch.utils.data.DistributedSampler):
            raise RuntimeError("DynamicBatchesStrategy: Lightning rebuilt the train loader on a DistributedSampler; "
                               "the strategy relies on lightning 2.6.6's data connector (_prepare_dataloader) to "
                               "leave it alone: install lightning==2.6.6")
        if self.fit is None:
            if not isinstance(dataloader, torch.utils.data.DataLoader) or \
                    isinstance(dataloader.dataset, torch.utils.data.IterableDataset):
                raise ValueError("DynamicBatchesStrategy needs train_dataloader() to return a DataLoader over a "
                                 "map-style dataset (len and indexing)")
            slowdown = self.slowdown[self.global_rank] if self.slowdown is not None else 1.0
            self.fit = FitBatches(dataloader, accumulate=trainer.accumulate_grad_batches, extra_lookahead=1,
                                  slowdown=slowdown, **self.dynbatch_options)
            if self.state_to_load is not None:
                self.fit.batches.load_state_dict(self.state_to_load)
                self.state_to_load = None
        return self.fit.train_loader()

    def training_step(self, *args, **kwargs):
        plan = self.fit.next_plan(self.lightning_module.trainer.fit_loop.epoch_loop.batch_idx)
        share = self.fit.begin_batch(plan, self.clock)
        if len(plan) == 0:
            with self.precision_plugin.train_step_context():
                return self._zero_loss_through_ddp()
        output = super().training_step(*args, **kwargs)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, torch.Tensor):
            raise TypeError("DynamicBatchesStrategy: training_step must return the loss tensor or a dict with "
                            "'loss' (returning None would leave the other ranks waiting in the reduction)")
        self.fit.record_loss(loss, len(plan))
        scaled = loss * share
        return {**output, "loss": scaled} if isinstance(output, Mapping) else scaled

    def _zero_loss_through_ddp(self) -> torch.Tensor:
        """0 x the sum of every trainable parameter, computed inside DDP's forward (so its reducer expects this
        rank's gradients): backward gives zero gradients and every bucket is reduced."""
        module = self.lightning_module
        parameters = [p for p in module.parameters() if p.requires_grad]
        module.forward = lambda: sum(p.sum() for p in parameters) * 0.0   # shadows the class's forward
        try:
            return self.model()
        finally:
            del module.forward

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.fit.optimizer_stepped(self.clock)
        return output

    def teardown(self) -> None:
        super().teardown()
        self.fit, self.clock = None, None


def _skip_distributed_sampler_for_training(trainer) -> None:
    """Lightning (2.6.6: _DataConnector._prepare_dataloader) re-creates the train DataLoader on a DistributedSampler
    before process_dataloader sees it; the strategy builds its own loader from the dataset and options, so the
    training stage skips that, and the other stages keep it. Set in the rank, on this trainer's connector only."""
    connector = trainer._data_connector
    prepare = type(connector)._prepare_dataloader

    def prepare_unless_training(dataloader, shuffle, mode):
        return dataloader if mode == RunningStage.TRAINING else prepare(connector, dataloader, shuffle, mode)

    connector._prepare_dataloader = prepare_unless_training


def _checked_launch(strategy: DynamicBatchesStrategy, launch, function, *args, trainer=None, **kwargs):
    if trainer is not None:
        strategy.check_trainer(trainer, args[0] if args else None)
    return launch(function, *args, trainer=trainer, **kwargs)


class DynamicBatchesCallback(Callback):
    """The strategy's callback (added by it): logging the exchanged measurements, checkpoint state, RNG states."""

    def __init__(self, strategy: DynamicBatchesStrategy):
        self.strategy = strategy
        self.rng_to_load: dict | None = None

    @property
    def state_key(self) -> str:
        return "DynamicBatches"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fit = self.strategy.fit
        if fit is None or fit.last_exchange is None:   # an accumulating batch: no optimizer step yet
            return
        compute, rank_samples = fit.last_exchange
        fit.last_exchange = None
        metrics = {"dynbatch/global_batch": float(sum(rank_samples))}
        for rank, (samples, seconds) in enumerate(zip(rank_samples, compute)):
            metrics[f"dynbatch/rank_batch/{rank}"] = float(samples)
            metrics[f"dynbatch/compute_s/{rank}"] = float(seconds)
        # the values are the same on every rank (exchanged): no sync
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.rng_to_load is not None:
            _set_rng_states(self.rng_to_load)
            self.rng_to_load = None

    def state_dict(self) -> dict:
        fit = self.strategy.fit
        if fit is None:
            return {}
        # every rank's RNG states: dump_checkpoint runs on every rank, rank 0 writes the file
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, _rng_states(self.strategy.root_device))
        return {"batches": fit.batches.state_dict(), "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.strategy.state_to_load = state["batches"]
        rank, world = self.strategy.global_rank, self.strategy.world_size
        self.rng_to_load = state["rng"][rank] if len(state["rng"]) == world else None


def _rng_states(device: torch.device) -> dict:
    """Plain tensors, lists and numbers, which torch.load(weights_only=True) reads back (numpy arrays it refuses)."""
    kind, keys, position, has_gauss, gauss = numpy.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
              "random": random.getstate()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, gauss))
    random.setstate(states["random"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
