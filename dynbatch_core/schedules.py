"""Global batch schedules: decide the global batch B at every epoch boundary from values all ranks share.

    schedule = build_schedule("static", initial_batch=64, min_batch=2, max_batch=1024)
    decision = schedule.decide(epoch=0, history=[])       # before the first epoch
    decision.global_batch, decision.lr_factor              # -> 64, 1.0
    # after each epoch: history.append(EpochSummary(...)); schedule.decide(epoch + 1, history)

A schedule sees only the per-epoch summaries (global batch, train loss, epoch seconds) that every rank holds
identically, so every rank decides the same B. `lr_factor` lets a schedule decay the learning rate on top of the
batch-size scaling (Smith et al.'s rule needs it); the training loop multiplies it in.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochSummary:
    epoch: int
    global_batch: int   # B used in that epoch (the last value, if it changed inside the epoch)
    train_loss: float   # mean training loss over the epoch's samples
    epoch_s: float      # wall seconds the epoch's training steps took


@dataclass(frozen=True)
class ScheduleDecision:
    global_batch: int
    lr_factor: float = 1.0


class Schedule:
    """Base class: B stays at its initial value."""

    name = "static"

    def __init__(self, *, initial_batch: int, min_batch: int = 1, max_batch: int | None = None):
        self.initial_batch = initial_batch
        self.min_batch = min_batch
        self.max_batch = max_batch if max_batch is not None else max(initial_batch, 1 << 30)

    def clamp(self, batch: int) -> int:
        return int(min(max(batch, self.min_batch), self.max_batch))

    def decide(self, epoch: int, history: list[EpochSummary]) -> ScheduleDecision:
        return ScheduleDecision(self.clamp(self.initial_batch))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StaticSchedule(Schedule):
    name = "static"


SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in (StaticSchedule,)}


def build_schedule(name: str, *, initial_batch: int, min_batch: int = 1, max_batch: int | None = None,
                   **options) -> Schedule:
    """The schedule called `name`; options a schedule does not take are ignored."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[name](initial_batch=initial_batch, min_batch=min_batch, max_batch=max_batch)


def scaled_lr(base_lr: float, global_batch: int, initial_batch: int, scaling: str) -> float:
    """The learning rate for `global_batch` when `base_lr` was tuned for `initial_batch`."""
    ratio = global_batch / initial_batch
    if scaling == "linear":
        return base_lr * ratio
    if scaling == "sqrt":
        return base_lr * ratio ** 0.5
    return base_lr
