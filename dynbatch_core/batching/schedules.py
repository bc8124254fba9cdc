"""Global batch schedules: decide the global batch B at every epoch boundary from values all ranks share.

    schedule = build_schedule("loss-plateau", initial_batch=64, min_batch=2, max_batch=1024, plateau_window=2)
    decision = schedule.decide(epoch=0, history=[])       # before the first epoch
    decision.global_batch, decision.lr_factor              # -> 64, 1.0
    # after each epoch: history.append(EpochSummary(...)); schedule.decide(epoch + 1, history)

A schedule sees only the per-epoch summaries (global batch, train loss, epoch seconds: the slowest rank's). The
training loop asks rank 0's schedule and broadcasts its answer (agreement.decided_by_rank0), so every rank trains
the same B even where clocks or math libraries differ. `lr_factor` lets a schedule decay the learning rate on top of the
batch-size scaling (Smith et al.'s rule needs it); the training loop multiplies it in. Every B is clamped to
[min_batch, max_batch].

Each `decide` is a pure function of (epoch, history): "the current B" is history[-1].global_batch, and the rule
for every schedule is in its class docstring:

    static          B stays at initial_batch
    increasing      B = initial_batch * 2^(epoch // every)
    decreasing      B = initial_batch / 2^(epoch // every), rounded down
    loss-plateau    double B when the loss has plateaued (P_k < plateau_threshold) or an epoch ran over
                    time_budget_s, else halve
    score           move B (x2 or /2) in the direction that last improved S = 0.8 loss/loss_0 + 0.2 time/time_0
    probe           one epoch at each of probe_sizes, then the one with the fastest log-loss decrease per second
    smith           multiply B by smith_factor at each of smith_epochs; past max_batch decay the LR instead
    goodput         every decide_every steps, the B that maximises throughput x statistical efficiency from the
                    measured gradient noise scale (goodput.py); B carries over between epochs

Because the decisions live in the history, state_dict() records only which schedule it was and the options it
decides with (load_state_dict refuses a state whose options differ); resuming a run means giving `decide` the same
history (the rows of epochs.csv).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .goodput import GoodputRule
from .noise_scale import NoiseScaleSmoother
from .registry import registered, taken_options


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
    options: tuple[str, ...] = ()  # the build_schedule options this schedule takes
    rule = None   # a schedule that also decides inside epochs holds its step rule here (goodput)

    def __init__(self, *, initial_batch: int, min_batch: int = 1, max_batch: int | None = None):
        self.initial_batch = initial_batch
        self.min_batch = min_batch
        self.max_batch = max_batch if max_batch is not None else max(initial_batch, 1 << 30)

    def clamp(self, batch: float) -> int:
        return int(min(max(batch, self.min_batch), self.max_batch))

    def epoch_scores(self, history: Sequence[EpochSummary]) -> list[float]:
        """The score this schedule gave each epoch of `history` (epochs.csv's schedule_score); none by default."""
        return []

    def current(self, history: Sequence[EpochSummary]) -> int:
        """The B of the last finished epoch (initial_batch before the first)."""
        return history[-1].global_batch if history else self.clamp(self.initial_batch)

    def decide(self, epoch: int, history: Sequence[EpochSummary]) -> ScheduleDecision:
        return ScheduleDecision(self.clamp(self.initial_batch))

    def decision_options(self) -> dict:
        """The values decide() depends on besides (epoch, history), as plain Python (lists, not tuples)."""
        return {name: _plain(getattr(self, name)) for name in ("initial_batch", "min_batch", "max_batch",
                                                                *self.options)}

    def state_dict(self) -> dict:
        """The schedule's name and decision options: decide() is a pure function of (epoch, history) given those,
        so they are its whole state, and restoring it into a schedule built with other options is refused."""
        return {"schedule": self.name, "options": self.decision_options()}

    def load_state_dict(self, state: dict, *, bounds_may_change: bool = False) -> None:
        """bounds_may_change: a resume on another number of ranks, where min_batch and max_batch follow the
        world size unless they were given."""
        if state.get("schedule", self.name) != self.name:
            raise ValueError(f"schedule state is for {state['schedule']!r}, this schedule is {self.name!r}")
        current = self.decision_options()
        for name, stored in state.get("options", {}).items():  # states saved before options were recorded: none
            if bounds_may_change and name in ("min_batch", "max_batch"):
                continue
            now = current.get(name, "<not an option of it>")
            if _plain(stored) != now:
                raise ValueError(f"schedule state has {name}={stored!r}, this {self.name} schedule has "
                                 f"{name}={now!r}; build it with the options the state was saved with")


def _plain(value):
    """Tuples as lists (recursively), so options compare equal however they were given and load with weights_only."""
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


class StaticSchedule(Schedule):
    """B = initial_batch for every epoch."""

    name = "static"


class IncreasingSchedule(Schedule):
    """B = initial_batch * 2^(epoch // every), clamped: doubles every `every` epochs, epoch 0 at initial_batch."""

    name = "increasing"
    options = ("every",)
    direction = 1

    def __init__(self, *, every: int = 1, **bounds):
        super().__init__(**bounds)
        if every < 1:
            raise ValueError(f"every must be >= 1 epoch, got {every}")
        self.every = every

    def decide(self, epoch: int, history: Sequence[EpochSummary]) -> ScheduleDecision:
        doublings = min(epoch // self.every, 64)  # past 2^64 the clamp has long taken over
        return ScheduleDecision(self.clamp(self.initial_batch * 2.0 ** (self.direction * doublings)))


class DecreasingSchedule(IncreasingSchedule):
    """B = floor(initial_batch / 2^(epoch // every)), clamped: halves every `every` epochs."""

    name = "decreasing"
    direction = -1


def plateau_progress(losses: Sequence[float]) -> float:
    """P_k = 1000 * (sum(losses) / (k * min(losses)) - 1): how far (in per mille) the mean of the last k losses
    lies above their minimum; 0 when the loss is flat."""
    return 1000.0 * (sum(losses) / (len(losses) * min(losses)) - 1.0)


class LossPlateauSchedule(Schedule):
    """Double B when training has plateaued, halve it while the loss still falls.

    With the last k = plateau_window epoch losses L_1..L_k:

        P_k = 1000 * (sum_j L_j / (k * min_j L_j) - 1)
        next B = 2B  if P_k < plateau_threshold  or  the last epoch took longer than time_budget_s
                 B/2 otherwise

    Before k epochs exist B stays (the time budget already applies). The class study's seed computed
    P = 1000 * (sum L / min L - 1), without the 1/k: that is >= 1000 (k - 1) even for a flat loss, so for k >= 2 and
    any sensible threshold it never signalled a plateau and the schedule only ever halved.
    """

    name = "loss-plateau"
    options = ("plateau_window", "plateau_threshold", "time_budget_s")

    def __init__(self, *, plateau_window: int = 2, plateau_threshold: float = 50.0,
                 time_budget_s: float | None = None, **bounds):
        super().__init__(**bounds)
        if plateau_window < 1:
            raise ValueError(f"plateau_window must be >= 1 epoch, got {plateau_window}")
        self.plateau_window = plateau_window
        self.plateau_threshold = plateau_threshold
        self.time_budget_s = time_budget_s

    def decide(self, epoch: int, history: Sequence[EpochSummary]) -> ScheduleDecision:
        batch = self.current(history)
        if history and self.time_budget_s is not None and history[-1].epoch_s > self.time_budget_s:
            return ScheduleDecision(self.clamp(2 * batch))
        if len(history) < self.plateau_window:
            return ScheduleDecision(batch)
        progress = plateau_progress([summary.train_loss for summary in history[-self.plateau_window:]])
        return ScheduleDecision(self.clamp(2 * batch if progress < self.plateau_threshold else batch // 2))


class ScoreSchedule(Schedule):
    """Hill-climb B on the score S_e = 0.8 * L_e / L_0 + 0.2 * t_e / t_0 (lower is better; L = train loss,
    t = epoch seconds, both relative to the first epoch).

    After the first epoch B doubles (the first move). After every later epoch e, with the relative change
    d = (S_e - S_{e-1}) / S_{e-1}:
        |d| < score_tolerance  -> keep B;
        d < 0 (improved)       -> repeat the last change of B (x2 or /2);
        d > 0 (worse)          -> reverse it.
    "The last change of B" is the most recent epoch-to-epoch change in the history; with none yet (the first move
    was clamped), B doubles. The loss falls with training whatever B does, so S mostly improves and B mostly keeps
    moving the way it last moved; the tolerance is what stops it once the loss flattens.
    """

    name = "score"
    options = ("score_tolerance",)

    def __init__(self, *, score_tolerance: float = 0.02, **bounds):
        super().__init__(**bounds)
        self.score_tolerance = score_tolerance

    @staticmethod
    def scores(history: Sequence[EpochSummary]) -> list[float]:
        first = history[0]
        return [0.8 * s.train_loss / max(first.train_loss, 1e-12) + 0.2 * s.epoch_s / max(first.epoch_s, 1e-12)
                for s in history]

    def epoch_scores(self, history: Sequence[EpochSummary]) -> list[float]:
        return self.scores(history) if history else []

    def decide(self, epoch: int, history: Sequence[EpochSummary]) -> ScheduleDecision:
        batch = self.current(history)
        if len(history) < 2:
            return ScheduleDecision(self.clamp(2 * batch) if history else batch)
        previous, latest = self.scores(history)[-2:]
        change = (latest - previous) / max(abs(previous), 1e-12)
        if abs(change) < self.score_tolerance:
            return ScheduleDecision(batch)
        last_grew = _last_change_grew([summary.global_batch for summary in history])
        double = last_grew if change < 0 else not last_grew
        return ScheduleDecision(self.clamp(2 * batch if double else batch // 2))


def _last_change_grew(batches: Sequence[int]) -> bool:
    """Whether the most recent change of B in `batches` was an increase (True when B never changed)."""
    for earlier, later in reversed(list(zip(batches, batches[1:]))):
        if later != earlier:
            return later > earlier
    return True


class ProbeSchedule(Schedule):
    """Epoch e < K runs probe_sizes[e] (clamped); from epoch K on, B stays at the probe with the largest rate

        r_e = -g_e / t_e,   g = numpy.gradient(ln L) over the K probe epochs (L = train loss, t = epoch seconds),

    i.e. the log-loss decrease per epoch around probe e (central difference (ln L_{e+1} - ln L_{e-1}) / 2, one-sided
    at the first and last probe) per second of that probe's epoch. Ties go to the earlier probe.
    Why this rule: the probes run one after another, so any comparison mixes the batch size with the stage of
    training. The lowest loss would always pick the last probe; the largest absolute drop would nearly always pick
    the first. The log counts a 10 % drop the same at any loss level, which shrinks, but cannot remove, the head
    start of early probes (the loss falls fastest at the start, and the first epoch's mean contains the random-init
    transient): list first the sizes you would be happy to keep.
    """

    name = "probe"
    options = ("probe_sizes",)

    def __init__(self, *, probe_sizes: Sequence[int] = (16, 32, 64, 128), **bounds):
        super().__init__(**bounds)
        if not probe_sizes:
            raise ValueError("probe_sizes needs at least one global batch")
        self.probe_sizes = [self.clamp(size) for size in probe_sizes]

    @staticmethod
    def rates(probes: Sequence[EpochSummary]) -> list[float]:
        """r_e for each probe epoch (one probe alone: 0)."""
        if len(probes) < 2:
            return [0.0] * len(probes)
        logs = [math.log(max(s.train_loss, 1e-12)) for s in probes]
        last = len(logs) - 1
        slopes = [logs[1] - logs[0]] + [(logs[e + 1] - logs[e - 1]) / 2 for e in range(1, last)] + \
                 [logs[last] - logs[last - 1]]
        return [-slope / max(s.epoch_s, 1e-12) for slope, s in zip(slopes, probes)]

    def epoch_scores(self, history: Sequence[EpochSummary]) -> list[float]:
        return self.rates(history[:len(self.probe_sizes)])

    def decide(self, epoch: int, history: Sequence[EpochSummary]) -> ScheduleDecision:
        if epoch < len(self.probe_sizes):
            return ScheduleDecision(self.probe_sizes[epoch])
        probes = history[:len(self.probe_sizes)]
        if not probes:
            return ScheduleDecision(self.clamp(self.initial_batch))
        rates = self.rates(probes)
        best = max(range(len(probes)), key=lambda e: (rates[e], -e))
        return ScheduleDecision(probes[best].global_batch)


class SmithSchedule(Schedule):
    """Smith et al., "Don't decay the learning rate, increase the batch size" (ICLR 2018).

    Where a step LR schedule would divide the LR by f = smith_factor (at each epoch listed in smith_epochs), B is
    multiplied by f instead. After m such epochs the ideal batch is B* = initial_batch * f^m; the decision is

        B = round(B*), lr_factor = 1              while round(B*) <= max_batch
        B = max_batch, lr_factor = max_batch / B*  once it would exceed it,

    so the noise scale lr/B falls by f at every milestone either way (f = 2 from 64 with max_batch 128:
    B = 128, 128, 128 and lr_factor = 1, 1/2, 1/4). Use it with --lr-scaling none: scaling the LR up with B
    would undo the rule.
    """

    name = "smith"
    options = ("smith_epochs", "smith_factor")

    def __init__(self, *, smith_epochs: Sequence[int] = (), smith_factor: float = 2.0, **bounds):
        super().__init__(**bounds)
        if not smith_factor > 1:
            raise ValueError(f"smith_factor must be > 1, got {smith_factor}")
        self.smith_epochs = sorted(set(int(e) for e in smith_epochs))
        self.smith_factor = float(smith_factor)

    def decide(self, epoch: int, history: Sequence[EpochSummary]) -> ScheduleDecision:
        milestones = sum(1 for e in self.smith_epochs if e <= epoch)
        ideal = self.initial_batch * self.smith_factor ** milestones
        if int(ideal + 0.5) <= self.max_batch:
            return ScheduleDecision(self.clamp(int(ideal + 0.5)))
        return ScheduleDecision(self.max_batch, self.max_batch / ideal)


class GoodputSchedule(Schedule):
    """Pollux's goodput, decided inside epochs: `rule` (goodput.GoodputRule) sees every step's time, and the
    training loop asks it every decide_every steps. At an epoch boundary B stays where it was.

    noise_smoother: the smoothed noise scale the rule reads (the training loop's: it feeds it, AdaScale reads it
    too). epoch_samples: the rule never chooses B beyond one epoch; the schedule's own max_batch stays as given
    (it is part of its state)."""

    name = "goodput"
    options = ("decide_every", "goodput_threshold")

    def __init__(self, *, decide_every: int = 50, goodput_threshold: float = 0.05,
                 noise_smoother: NoiseScaleSmoother | None = None, epoch_samples: int | None = None, **bounds):
        super().__init__(**bounds)
        self.decide_every, self.goodput_threshold = decide_every, goodput_threshold
        rule_max = self.max_batch if epoch_samples is None else min(self.max_batch, epoch_samples)
        self.rule = GoodputRule(initial_batch=self.clamp(self.initial_batch), min_batch=self.min_batch,
                                max_batch=rule_max, decide_every=decide_every, threshold=goodput_threshold,
                                smoother=noise_smoother)

    def decide(self, epoch: int, history: Sequence[EpochSummary]) -> ScheduleDecision:
        return ScheduleDecision(self.current(history))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict, *, bounds_may_change: bool = False) -> None:
        super().load_state_dict(state, bounds_may_change=bounds_may_change)
        self.rule.load_state_dict(state["rule"], same_ranks=not bounds_may_change)


SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in (
    StaticSchedule, IncreasingSchedule, DecreasingSchedule, LossPlateauSchedule, ScoreSchedule, ProbeSchedule,
    SmithSchedule, GoodputSchedule)}


def build_schedule(name: str, *, initial_batch: int, min_batch: int = 1, max_batch: int | None = None,
                   noise_smoother: NoiseScaleSmoother | None = None, epoch_samples: int | None = None,
                   **options) -> Schedule:
    """The schedule called `name`; options a schedule does not take are ignored. noise_smoother, epoch_samples:
    what a step rule (goodput) reads, see GoodputSchedule."""
    cls = registered(SCHEDULES, "schedule", name)
    rule_inputs = {"noise_smoother": noise_smoother, "epoch_samples": epoch_samples} if cls is GoodputSchedule else {}
    return cls(initial_batch=initial_batch, min_batch=min_batch, max_batch=max_batch, **rule_inputs,
               **taken_options(cls, options))

