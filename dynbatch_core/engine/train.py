"""The per-rank training loop: `train_worker` joins the process group and runs `RankTrainer.fit()`.

Started by launch.run() (spawn) or launch.train_under_torchrun(); not called directly. Each step:
  1. the schedule's global batch B (decided at epoch boundaries from the epoch summaries),
  2. the balancer's split of B over ranks (decided every step from all ranks' measured compute times),
  3. this rank's slice of the epoch's global sample order (sampler.py),
  4. step.train_step: forward/backward on the slice, loss scaled by 1/B, gradients summed over ranks.
Rank 0 makes both decisions and broadcasts them (agreement.py); once per epoch every rank checks that all ranks
hold the same B, split and step, and an epoch's seconds are the slowest rank's.
Only rank 0 writes files; per-rank step rows are gathered to it at the end of every epoch. Checkpoints (every
--checkpoint-every steps and at every epoch end) hold everything that makes a resumed run continue bit-exactly.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .agreement import decided_by_rank0, max_over_ranks
from ..batching.balancers import build_balancer
from .checkpoint import capture_rng, restore_rng, save_checkpoint
from ..config import RunConfig, balancer_options, schedule_options, with_current_names
from .validation import check_same_computation
from .console import log, progress_bar
from ..data import collate_batch, load_datasets
from .evaluation import evaluate, recompute_batch_norm
from .elastic import ResumeState, check_nothing_lost, newest_checkpoint, record_published, with_node_slowdowns
from .distributed import init_process_group, job_store, resolve_gradient_sync, threads_per_rank
from .faults import InjectedFault
from .emulation import Emulation, SlowdownPlan
from ..batching.lr import adascale_gain, decay_factor, scaled_lr, warmup_lr
from ..records import EPOCH_COLUMNS, PROGRESS_FILE, STEP_COLUMNS, ProgressFile, write_atomic, write_table
from ..models import build_model
from ..batching.noise_scale import NoiseEstimate, NoiseScaleSmoother, epoch_noise_scale, fit_step, mean_estimate
from ..records import git_commit
from .sampler import StepPlan
from ..batching.schedules import EpochSummary, build_schedule
from .ddp_step import ddp_train_step, wrap_ddp
from .dynamic_batches import DynamicBatches, rank_seed
from .step import GradientSync, StepOptions, StepResult, train_step


def train_worker(config: RunConfig, *, rank: int, local_rank: int, local_world_size: int, run_dir: Path,
                 init_method: str, device_kind: str, draw_progress: bool) -> None:
    """draw_progress: rank 0 draws its own progress bar (torchrun); under run() the parent process draws it."""
    torch.set_num_threads(config.threads or threads_per_rank(local_world_size))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    init_process_group(device_kind, rank, config.world_size, init_method, config.timeout_s)
    device = torch.device("cuda", local_rank) if device_kind == "cuda" else torch.device("cpu")
    if init_method == "env://":
        config = with_node_slowdowns(config)
    # Under torchrun a restarted or resized job resumes whatever it last published, even from another node.
    found = newest_checkpoint(Path(run_dir)) if config.resume is not None or init_method == "env://" else None
    if config.resume is not None and found is None:
        raise ValueError(f"--resume {config.resume}: no rank finds a checkpoint to resume from")
    check_nothing_lost(job_store(), found, Path(run_dir))   # torchrun: never start over from less than was published
    trainer = RankTrainer(config, rank=rank, device=device, run_dir=Path(run_dir), draw_progress=draw_progress)
    if found is not None:
        trainer.resume(found)
    trainer.fit()
    dist.barrier()
    # Only after success: tearing the group down on a failure would close this rank's connections, failing its
    # peers, before its own error is written (the launcher reports the earliest, launch._first_failure).
    dist.destroy_process_group()


@dataclasses.dataclass
class Progress:
    """Where the run stands; saved in checkpoints. Counters are global (all ranks' samples)."""
    epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    training_s: float = 0.0            # finished epochs' training seconds (evaluation excluded)
    previous_target_lr: float = 0.0    # the last epoch's undecayed LR, the start of a warm-up ramp
    epoch_loss_sum: float = 0.0        # the current epoch so far ...
    epoch_samples: int = 0
    epoch_steps: int = 0
    epoch_elapsed_s: float = 0.0
    scaled_samples: float = 0.0        # AdaScale: samples counted at the initial batch (sum of gain x B_0)


class RankTrainer:
    def __init__(self, config: RunConfig, *, rank: int, device: torch.device, run_dir: Path, draw_progress: bool):
        self.config, self.rank, self.device, self.run_dir = config, rank, device, run_dir
        self.draw_progress = draw_progress and config.progress and rank == 0
        self.world_size = config.world_size
        self.train_set, self.test_set, _ = load_datasets(
            config.dataset, data_dir=config.data_dir, download=config.download, train_samples=config.train_samples,
            test_samples=config.test_samples, augment=config.augment, seed=config.seed)
        self.module = start_model(config, self.train_set.spec, rank, device)  # the bare model: state, evaluation
        self.gradient_sync = resolve_gradient_sync(config.gradient_sync, device)
        if self.gradient_sync == "fsdp":   # sharded in place: self.module is then the FSDP root
            fsdp.prepare_fsdp(fsdp.shard_per_block(self.module))
        self.model = wrap_ddp(self.module, device) if self.gradient_sync == "ddp" else self.module
        self.sync = GradientSync(self.module.parameters(), world_size=self.world_size) \
            if self.gradient_sync == "explicit" else None
        self.optimizer = _build_optimizer(config, self.module)
        # The smoothed noise scale, fed every step: AdaScale's gain and the goodput rule read this one copy (every
        # rank holds it alike; rank 0 decides).
        self.noise_smoother = NoiseScaleSmoother()
        self.schedule = build_schedule(config.schedule, **schedule_options(config), noise_smoother=self.noise_smoother,
                                       epoch_samples=len(self.train_set))   # the rule's B never beyond the epoch
        self.balancer = build_balancer(config.balancer_name, self.world_size, **balancer_options(config))
        self.slowdown = SlowdownPlan.from_options(self.world_size, slowdown=config.slowdown,
                                                  trace=config.slowdown_trace)
        # The sampler, the planned loader, the lookahead and every decision: the object a user's loop drives too.
        self.batches = DynamicBatches(self.train_set, global_batch=self.schedule, balancer=self.balancer,
                                      seed=config.seed, device=device, rank=rank, world_size=self.world_size,
                                      collate_fn=collate_batch, num_workers=config.loader_workers)
        self.sampler, self.loader, self.decisions = self.batches.sampler, self.batches.loader, self.batches.decisions
        self.emulation = Emulation.from_ms(config.emulated_sample_ms, config.emulated_step_ms,
                                           sleep=not config.skip_emulated_sleep)
        self.step_options = StepOptions(
            clip_grad_norm=config.clip_grad_norm, max_micro_batch=config.max_micro_batch,
            autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision),
            scaler=torch.amp.GradScaler("cuda") if config.precision == "fp16" else None,
            measure_noise=config.noise_measured)
        self.noise_estimates: list[NoiseEstimate | None] = []   # this epoch's steps (with --measure-noise)
        self.fault = InjectedFault.from_env()
        self.git_commit = git_commit()
        self.progress_file = ProgressFile(run_dir / PROGRESS_FILE)
        self.progress = Progress(previous_target_lr=self.target_lr(config.initial_batch, 1.0))
        self.step_rows: list[dict] = []    # rank 0: all ranks' rows of finished epochs
        self.epoch_rows: list[dict] = []   # rank 0
        self.my_rows: list[dict] = []      # this rank's rows of the current epoch

    @property
    def adascale(self) -> bool:
        return self.config.lr_scaling == "adascale"

    def steps_left(self) -> bool:
        if self.adascale and self.progress.scaled_samples >= self.config.epochs * len(self.train_set):
            return False   # AdaScale's budget: the run's samples counted at the initial batch (its LR has decayed)
        return self.config.max_steps is None or self.progress.global_step < self.config.max_steps

    def epochs_left(self) -> bool:
        """AdaScale's run ends when its budget is spent (steps_left), which takes more real epochs than --epochs
        whenever its gain stays below B/B_0; every other run ends after --epochs."""
        return self.adascale or self.progress.epoch < self.config.epochs

    def epoch_label(self, epoch: int) -> str:
        if self.adascale:
            budget = self.config.epochs * len(self.train_set)
            return f"epoch {epoch + 1} (AdaScale budget {min(1.0, self.progress.scaled_samples / budget):.0%} spent)"
        return f"epoch {epoch + 1}/{self.config.epochs}"

    def fit(self) -> None:
        while self.epochs_left() and self.steps_left():
            self.train_epoch()
        state, _ = self.model_states(optimizer=False)   # collective under FSDP
        if self.rank == 0:
            write_atomic(self.run_dir / "model.pt", lambda tmp: torch.save(state, tmp))

    @property
    def history(self) -> list[EpochSummary]:
        return self.decisions.history

    def train_epoch(self) -> None:
        progress, epoch = self.progress, self.progress.epoch
        decision = self.batches.begin_epoch(epoch)   # positions the sampler, plans, checks every rank agrees
        self.fault.before_epoch(self.rank, epoch)
        bar = progress_bar(total=progress.epoch_steps + math.ceil(self.sampler.remaining / decision.global_batch),
                           description=f"{self.epoch_label(epoch)} B={decision.global_batch}",
                           enabled=self.draw_progress)
        bar.update(progress.epoch_steps)
        segment_started = time.perf_counter()
        for (images, labels), plan in self.epoch_batches(epoch):
            self.fault.before_step(self.rank, progress.global_step)
            lr, gain = self.step_lr(plan.global_batch, decision.lr_factor)
            started = time.perf_counter()
            slowdown = self.slowdown.factor(self.rank, progress.global_step)
            result = self.train_step(images.to(self.device), labels.to(self.device), plan, slowdown)
            step_s = time.perf_counter() - started
            self.record_noise(result)   # before the step rule reads the smoothed noise scale
            # What the step took beyond the slowest rank's compute: a cost per step no split removes (none under
            # emulation, whose cost is the whole step's).
            overhead_s = 0.0 if self.emulation is not None else max(0.0, step_s - max(result.compute_s))
            self.batches.trained(plan, result.compute_s, result.rank_batches, loss_sums=result.loss_sums,
                                 overhead_s=overhead_s)
            batch = self.decisions.batch   # the current global batch: goodput may move it mid-epoch
            self.my_rows.append(self.step_row(plan, result, lr, slowdown))
            self.count(plan, result, gain)
            bar.set_postfix(loss=f"{result.loss:.3f}", split=",".join(map(str, result.rank_batches)), refresh=False)
            bar.update()
            self.report_progress(plan, result, batch, gain)
            if self.checkpoint_due(plan):
                progress.epoch_elapsed_s += time.perf_counter() - segment_started
                self.save_checkpoint()
                segment_started = time.perf_counter()
        bar.close()
        progress.epoch_elapsed_s += time.perf_counter() - segment_started
        # The next epoch's warm-up starts from this epoch's LR at its B, not from its (possibly short) last step's.
        epoch_lr = self.target_lr(batch, decision.lr_factor)
        complete = not (self.remaining_after(self.batches.trained_plan) > 0 and not self.steps_left())
        self.finish_epoch(batch, epoch_lr, complete=complete)

    def epoch_batches(self, epoch: int):
        """The epoch's ((images, labels), plan) steps, while the run has steps left."""
        batches = iter(self.loader)
        while self.steps_left():
            try:
                yield next(batches)
            except StopIteration:
                return

    def record_noise(self, result: StepResult) -> None:
        """Keep this step's noise estimate for the epoch (None where it was not finite) and smooth it."""
        if result.noise_points is None:
            return
        estimate = fit_step(result.noise_points, len(self.train_set))
        self.noise_estimates.append(estimate)
        self.noise_smoother.update(estimate)

    def step_row(self, plan: StepPlan, result: StepResult, lr: float, slowdown: float) -> dict:
        """This rank's steps.csv row of the step just trained."""
        line = self.balancer.cost_line(self.rank)
        return {"epoch": self.progress.epoch, "step": self.progress.global_step, "rank": self.rank,
                "world_size": self.world_size, "rank_batch": result.rank_batches[self.rank],
                "global_batch": plan.global_batch, "slowdown": slowdown, "compute_s": result.compute_s[self.rank],
                "wait_s": result.wait_s, "loss": result.loss_sums[self.rank] / max(1, result.rank_batches[self.rank]),
                "lr": lr, "model_a_s": None if line is None else line.a_s,
                "model_c_s": None if line is None else line.c_s, **self.gradient_columns(result)}

    def count(self, plan: StepPlan, result: StepResult, gain: float) -> None:
        """Move the run's counters past the step just trained (AdaScale counts gain x B_0 samples of progress)."""
        progress = self.progress
        progress.epoch_loss_sum += sum(result.loss_sums)
        progress.epoch_samples += plan.global_batch
        progress.samples_seen += plan.global_batch
        progress.scaled_samples += gain * self.config.lr_batch if self.adascale else plan.global_batch
        progress.epoch_steps += 1
        progress.global_step += 1

    def report_progress(self, plan: StepPlan, result: StepResult, batch: int, gain: float) -> None:
        """Rank 0: the launcher's progress file, at the run's last step and whenever it is due."""
        remaining, epoch = self.remaining_after(plan), self.progress.epoch
        last_step = not self.steps_left() or (not self.adascale and epoch + 1 == self.config.epochs and remaining == 0)
        if self.rank == 0 and (last_step or self.progress_file.due()):
            self.progress_file.report(
                epoch=epoch, step=self.progress.global_step, global_batch=plan.global_batch, loss=result.loss,
                split=result.rank_batches, total_steps=self.expected_total_steps(epoch, remaining, batch, gain))

    def checkpoint_due(self, plan: StepPlan) -> bool:
        """A periodic checkpoint (--checkpoint-every) inside the epoch; its end checkpoints anyway."""
        config = self.config
        return bool(config.checkpoints and config.checkpoint_every
                    and self.progress.global_step % config.checkpoint_every == 0 and self.remaining_after(plan) > 0)

    def expected_total_steps(self, epoch: int, remaining: int, batch: int, gain: float) -> int:
        """The run's steps as far as they can be told now (the progress bar's total)."""
        config, progress = self.config, self.progress
        if self.adascale:   # the budget left, at the samples the last step counted
            left = max(0.0, config.epochs * len(self.train_set) - progress.scaled_samples)
            total = progress.global_step + math.ceil(left / (gain * config.lr_batch))
        else:
            total = progress.global_step + math.ceil(remaining / batch) \
                + (config.epochs - epoch - 1) * math.ceil(len(self.train_set) / batch)
        return min(total, config.max_steps or total)

    def target_lr(self, batch: int, lr_factor: float) -> float:
        """The LR at global batch `batch` before warm-up, AdaScale's gain and decay: --lr scaled from
        --lr-reference-batch by --lr-scaling, times the schedule's factor."""
        config = self.config
        return scaled_lr(config.lr, batch, config.lr_batch, config.lr_scaling) * lr_factor

    def step_lr(self, batch: int, lr_factor: float) -> tuple[float, float]:
        """(this step's learning rate, AdaScale's gain: 1 without it), set on the optimizer. Warm-up after an epoch
        boundary raised the LR, AdaScale's gain, decay."""
        config, progress = self.config, self.progress
        target_lr, total_samples = self.target_lr(batch, lr_factor), config.epochs * len(self.train_set)
        if self.adascale:  # decay follows the progress counted at B_0 (scale-invariant)
            gain = decided_by_rank0(lambda: [adascale_gain(self.noise_smoother.noise_scale, batch, config.lr_batch)],
                                    1, device=self.device)[0]
            lr = target_lr * gain * decay_factor(config.lr_decay, progress.scaled_samples, total_samples)
        else:
            gain = 1.0
            lr = warmup_lr(progress.previous_target_lr, target_lr, progress.epoch_steps, config.warmup_steps) \
                * decay_factor(config.lr_decay, progress.samples_seen, total_samples)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr, gain

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, plan: StepPlan, slowdown: float) -> StepResult:
        """The step on this rank's slice of `plan` (its noise points as a --fault nonfinite hook left them)."""
        result = self._step(images, labels, plan, slowdown)
        return dataclasses.replace(result, noise_points=self.fault.noise_points(
            self.progress.global_step, result.noise_points, result.rank_batches))

    def _step(self, images: torch.Tensor, labels: torch.Tensor, plan: StepPlan, slowdown: float) -> StepResult:
        options = dict(global_batch=plan.global_batch, rank=self.rank, slowdown=slowdown, emulation=self.emulation,
                       options=self.step_options, largest_slice=max(plan.rank_batches))
        if self.gradient_sync == "ddp":
            return ddp_train_step(self.model, self.optimizer, images, labels, **options)
        if self.gradient_sync == "fsdp":
            return fsdp.fsdp_train_step(self.model, self.optimizer, images, labels, **options)
        return train_step(self.model, self.optimizer, images, labels, sync=self.sync, **options)

    def gradient_columns(self, result: StepResult) -> dict:
        """steps.csv's squared norms of this rank's mean gradient and of the step's (--measure-noise)."""
        if result.noise_points is None:
            return {"rank_grad_sq": None, "global_grad_sq": None}
        global_sq = result.noise_points[-1][1]
        if self.world_size == 1:
            return {"rank_grad_sq": global_sq, "global_grad_sq": global_sq}
        with_samples = [rank for rank, b in enumerate(result.rank_batches) if b > 0]
        mine = result.noise_points[with_samples.index(self.rank)][1] if self.rank in with_samples else None
        return {"rank_grad_sq": mine, "global_grad_sq": global_sq}

    def noise_columns(self) -> dict:
        """epochs.csv's noise scale of the epoch: a ratio of the mean trace to the mean |G|^2 over its steps."""
        if not self.step_options.measure_noise:
            return {"noise_scale": None, "noise_gradient_sq": None, "noise_trace": None, "noise_missing": None}
        noise_scale, missing = epoch_noise_scale(self.noise_estimates)
        mean = mean_estimate(self.noise_estimates)
        return {"noise_scale": noise_scale, "noise_gradient_sq": mean.gradient_sq, "noise_trace": mean.trace,
                "noise_missing": missing}

    def remaining_after(self, plan: StepPlan | None) -> int:
        return self.batches.remaining_after(plan)

    def finish_epoch(self, batch: int, target_lr: float, *, complete: bool) -> None:
        """Evaluate, gather and write the tables; a complete epoch also moves the run on and checkpoints."""
        config, progress = self.config, self.progress
        epoch_s = max_over_ranks(progress.epoch_elapsed_s, device=self.device)  # the slowest rank's, on every rank
        train_loss = progress.epoch_loss_sum / max(1, progress.epoch_samples)
        # The balancer's end of epoch; a complete epoch joins the history the schedule decides from.
        self.batches.end_epoch(EpochSummary(progress.epoch, batch, train_loss, epoch_s) if complete else None)
        my_samples = sum(row["rank_batch"] for row in self.my_rows)  # this epoch's rows
        if config.eval_bn_samples:
            recompute_batch_norm(self.module, self.train_set, samples=config.eval_bn_samples, rank=self.rank,
                                 world_size=self.world_size, device=self.device)
        test_loss, test_acc = evaluate(self.module, self.test_set, rank=self.rank, world_size=self.world_size,
                                       device=self.device, buffer_weight=my_samples)
        noise = self.noise_columns()
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(self.my_rows, gathered, dst=0)
        if self.rank == 0:
            self.step_rows.extend(sorted((row for rows in gathered for row in rows),
                                         key=lambda row: (row["step"], row["rank"])))
            self.epoch_rows.append({
                "epoch": progress.epoch, "global_batch": batch, "steps": progress.epoch_steps,
                "samples": progress.epoch_samples, "train_loss": train_loss, "test_loss": test_loss,
                "test_acc": test_acc, "world_size": self.world_size, "epoch_s": epoch_s, "wall_s": progress.training_s + epoch_s,
                "samples_per_s": progress.epoch_samples / epoch_s if epoch_s > 0 else float("nan"),
                **noise})
            for row, score in zip(self.epoch_rows, self.schedule.epoch_scores(self.history)):
                row["schedule_score"] = score
            write_table(self.run_dir / "steps.csv", self.step_rows, STEP_COLUMNS)
            write_table(self.run_dir / "epochs.csv", self.epoch_rows, EPOCH_COLUMNS)
            log(f"{self.epoch_label(progress.epoch)}: B={batch} steps={progress.epoch_steps} "
                f"train_loss={train_loss:.4f} test_loss={test_loss:.4f} test_acc={test_acc:.4f} "
                f"{progress.epoch_samples / max(epoch_s, 1e-9):.0f} samples/s"
                + (f" B_simple={noise['noise_scale']:.1f} ({noise['noise_missing']} of {progress.epoch_steps} steps "
                   f"with |G|^2 <= 0)" if self.step_options.measure_noise else ""))
        if not complete:  # stopped by --max-steps inside the epoch; the last periodic checkpoint stays the latest
            return
        self.my_rows, self.noise_estimates = [], []
        self.progress = Progress(epoch=progress.epoch + 1, global_step=progress.global_step,
                                 samples_seen=progress.samples_seen, training_s=progress.training_s + epoch_s,
                                 previous_target_lr=target_lr,
                                 scaled_samples=progress.scaled_samples)
        if config.checkpoints:
            self.save_checkpoint()

    def model_states(self, *, optimizer: bool = True) -> tuple[dict, dict]:
        """(model state, optimizer state) as plain CPU tensors, unsharded (collective under FSDP: every rank calls
        it, rank 0 holds the result)."""
        if self.gradient_sync == "fsdp":
            return fsdp.full_model_state(self.module), \
                fsdp.full_optimizer_state(self.module, self.optimizer) if optimizer else {}
        model_state = {name: tensor.detach().cpu() for name, tensor in self.module.state_dict().items()}
        return model_state, self.optimizer.state_dict() if optimizer else {}

    def shared_state(self, epoch_elapsed_s: float, model_state: dict, optimizer_state: dict) -> dict:
        """What every rank holds alike (rank 0's copy), whatever the world size."""
        progress = dataclasses.replace(self.progress, epoch_elapsed_s=epoch_elapsed_s)
        return {"model": model_state, "optimizer": optimizer_state,
                "schedule": self.schedule.state_dict(), "balancer": self.balancer.state_dict(),
                "sampler": self.sampler.state_dict(trained=self.batches.trained_plan),
                "progress": dataclasses.asdict(progress), "decisions": self.decisions.state_dict(),
                "step_rows": self.step_rows, "epoch_rows": self.epoch_rows, "config": self.config.to_dict(),
                "noise_estimates": [[] if e is None else [e.gradient_sq, e.trace] for e in self.noise_estimates],
                "noise_smoother": self.noise_smoother.state_dict(),
                "git_commit": self.git_commit,
                "scaler": self.step_options.scaler.state_dict() if self.step_options.scaler is not None else {}}

    def rank_state(self) -> dict:
        """What differs between ranks: batch-norm buffers (each rank saw its own slices), RNG, this epoch's rows."""
        buffers = {name: tensor.detach().cpu() for name, tensor in self.module.named_buffers()
                   if tensor.is_floating_point()}
        return {"buffers": buffers, "rng": capture_rng(), "rows": self.my_rows}

    def save_checkpoint(self) -> None:
        """Collective: rank 0 gathers every rank's part and writes the one file."""
        epoch_elapsed_s = max_over_ranks(self.progress.epoch_elapsed_s, device=self.device)
        model_state, optimizer_state = self.model_states()
        parts = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(self.rank_state(), parts, dst=0)
        if self.rank == 0:
            save_checkpoint(self.run_dir, step=self.progress.global_step, world_size=self.world_size,
                            state={**self.shared_state(epoch_elapsed_s, model_state, optimizer_state),
                                   "ranks": parts})
            record_published(job_store(), self.progress.global_step)
        dist.barrier()  # nobody runs ahead of a checkpoint that a restart would resume from

    def resume(self, found: ResumeState) -> None:
        """Continue from a checkpoint written by any number of ranks.

        Same world size: every rank gets its own buffers, RNG and rows back, and the balancer its state: bit-exact.
        Another world size: the update of each step is still that of one step on the same union batch, so with
        the same global batches the weights follow the uninterrupted run up to float summation order. Batch-norm
        buffers become the mean of the old ranks' (approximate: they depend on the split), rank 0 carries the
        epoch's rows, and the balancer starts over from the equal split (the old ranks cannot be matched to the
        new ones).
        """
        state, same_size = found.state, found.state["world_size"] == self.world_size
        check_same_computation(RunConfig.from_dict(with_current_names(state["config"])), self.config, where=f"checkpoint {found.folder}")
        saved_sync = resolve_gradient_sync(state["config"].get("gradient_sync", "auto"), self.device)
        if (saved_sync == "fsdp") != (self.gradient_sync == "fsdp"):
            raise ValueError(f"checkpoint {found.folder} was written with --gradient-sync {saved_sync}; resume it "
                             f"with {'fsdp' if saved_sync == 'fsdp' else 'ddp or explicit'}, not {self.gradient_sync}")
        if self.gradient_sync == "fsdp":   # the full state, sharded onto this job's ranks
            fsdp.load_full_state(self.module, self.optimizer, state["model"], state["optimizer"])
        else:
            self.module.load_state_dict(state["model"])
        parts = state["ranks"]
        mine = parts[self.rank] if same_size else None
        buffers = mine["buffers"] if same_size else mean_buffers([part["buffers"] for part in parts])
        with torch.no_grad():
            for name, tensor in self.module.named_buffers():
                if name in buffers:
                    tensor.copy_(buffers[name])
        if self.gradient_sync != "fsdp":
            self.optimizer.load_state_dict(state["optimizer"])
        if self.step_options.scaler is not None and state.get("scaler"):
            self.step_options.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"], bounds_may_change=not same_size)
        if same_size:
            self.balancer.load_state_dict(state["balancer"])
        self.batches.load_sampler_state(state["sampler"])
        progress = dict(state["progress"])
        # before the decisions had their own state, the schedule's history and the step rule's lived here
        legacy = {"history": state.get("history", []), "rule_batch": progress.pop("batch", 0),
                  "next_decision": progress.pop("next_decision", 0)}
        self.progress = Progress(**progress)
        self.decisions.load_state_dict(state.get("decisions", legacy))
        self.batches.global_step = self.progress.global_step
        self.step_rows, self.epoch_rows = state["step_rows"], state["epoch_rows"]
        self.noise_estimates = [NoiseEstimate(*pair) if pair else None for pair in state.get("noise_estimates", [])]
        if "noise_smoother" in state:
            self.noise_smoother.load_state_dict(state["noise_smoother"])
        if same_size:
            self.my_rows = mine["rows"]
        else:  # rank 0 carries the old ranks' rows of this epoch into the gathered tables
            self.my_rows = [row for part in parts for row in part["rows"]] if self.rank == 0 else []
        if same_size:
            restore_rng(mine["rng"])
        else:   # the old ranks' generators cannot be matched to the new ranks: a fresh one of each rank's own
            torch.manual_seed(rank_seed(self.config.seed, self.rank) + self.progress.global_step)
        if self.rank == 0:
            change = "" if same_size else (f"; written by {state['world_size']} ranks, now {self.world_size}: "
                                           f"the {self.balancer.name} balancer starts over from the equal split")
            log(f"resumed from {found.folder} (step {state['step']}, epoch {self.progress.epoch + 1}){change}")


class _LazyFSDP:
    """engine/fsdp.py, imported at first use: torch.distributed.fsdp costs ~1.4 s per process here, which every
    rank of a ddp or explicit run would otherwise pay."""

    def __getattr__(self, name):
        from . import fsdp as module
        return getattr(module, name)


fsdp = _LazyFSDP()


def start_model(config: RunConfig, spec, rank: int, device: torch.device) -> torch.nn.Module:
    """The model every rank starts from (rank 0's weights and buffers, broadcast); afterwards the default RNG is
    this rank's own (dropout)."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_channels=spec.in_channels, num_classes=spec.num_classes, norm=config.norm)
    torch.manual_seed(rank_seed(config.seed, rank))
    if config.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)  # identical start on every rank, whatever the RNG did
    return model


def mean_buffers(per_rank: list[dict]) -> dict:
    return {name: sum(buffers[name].double() for buffers in per_rank).div(len(per_rank)).to(tensor.dtype)
            for name, tensor in per_rank[0].items()}


def _build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)
