"""A run's decisions without torch: plan -> split -> observe -> end of epoch -> decide, for any driver.

    decisions = RunDecisions(schedule, balancer, lookahead=4)          # lookahead: how far the loader reads ahead
    decision, plans = decisions.start_epoch(epoch, next_step=0)        # the schedule's B and LR factor, first plans
    for step ...:                                                      # each step trains the split planned for it
        plans = decisions.step_trained(step, global_step, compute_s, rank_batches)   # observe; plan one more
    decisions.end_epoch(EpochSummary(...))                             # the history the schedule decides from

The engine (RankTrainer), the object for a user's loop (engine/dynamic_batches.py) and a simulator all drive this
one class, so a split or a B is decided the same way whoever trains. `plans` are {step of the epoch: requested
split}; the sampler cuts a step that asks for more than the epoch has left (cut_to_remaining), so its last step
may be short and a rank's slice empty.

Lookahead: a prefetching loader reads a step's indices `lookahead` steps before it is trained, so the split of step
t + lookahead + 1 is planned when step t has been trained, from what was measured up to step t. A step rule
(goodput) that changes B mid-epoch therefore sees its new B trained `lookahead` steps later: its next decision is
due `wait + lookahead` steps on.

`decide(choose, count, integers)` returns the decision on every rank: in one process choose() itself, under
torch.distributed rank 0's answer broadcast (agreement.decided_by_rank0), so every rank plans the same.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from .balancer_base import Balancer, largest_remainder_split
from .schedules import EpochSummary, Schedule, ScheduleDecision

Decide = Callable[[Callable[[], Sequence[float]], int, bool], list]


def decide_here(choose: Callable[[], Sequence[float]], count: int, integers: bool) -> list:
    """One process (or a simulator): the decision is choose()'s."""
    values = list(choose())
    return [int(round(v)) for v in values] if integers else [float(v) for v in values]


def loader_lookahead(num_workers: int, prefetch_factor: int | None = None) -> int:
    """How many steps a DataLoader with these options asks its sampler for before the step it returns: 0 without
    workers, else num_workers x prefetch_factor (torch's default 2)."""
    return 0 if num_workers == 0 else num_workers * (prefetch_factor or 2)


def cut_to_remaining(requested: Sequence[int], remaining: int) -> list[int]:
    """The split a step really trains: the requested one, or what is left of the epoch in its proportions (largest
    remainder, so a rank may get 0)."""
    if sum(requested) <= remaining:
        return list(requested)
    return largest_remainder_split(remaining, requested, min_size=0)


class RunDecisions:
    """The schedule's B at epoch boundaries (and inside epochs for a step rule), the balancer's split of every
    step, planned `lookahead` steps ahead; see the module docstring."""

    def __init__(self, schedule: Schedule, balancer: Balancer, *, lookahead: int = 0, decide: Decide = decide_here):
        self.schedule, self.balancer, self.lookahead, self.decide = schedule, balancer, lookahead, decide
        self.history: list[EpochSummary] = []   # finished epochs, what the schedule decides from
        self.decision = ScheduleDecision(schedule.clamp(schedule.initial_batch))   # the current epoch's
        self.rule_batch = 0      # the B a step rule set inside the current epoch (0: the epoch's decision)
        self.next_decision = schedule.rule.decide_every if schedule.rule else 0   # global step of its next decision
        self.next_planned = 0    # the first step of the epoch without a plan

    @property
    def batch(self) -> int:
        """The global batch new steps are planned at."""
        return self.rule_batch or self.decision.global_batch

    def start_epoch(self, epoch: int, *, next_step: int, planned: Sequence[int] = (),
                    replanned: dict[int, int] | None = None) -> tuple[ScheduleDecision, dict[int, list[int]]]:
        """The schedule's decision for `epoch` and the plans of steps next_step .. next_step + lookahead that
        `planned` (the steps a resumed sampler already holds) lacks. replanned: {step: global batch} of steps that
        were planned on another number of ranks: the same B, split anew."""
        def choose():
            decision = self.schedule.decide(epoch, self.history)
            return [decision.global_batch, decision.lr_factor]
        global_batch, lr_factor = self.decide(choose, 2, False)
        self.decision = ScheduleDecision(int(global_batch), lr_factor)
        replanned = replanned or {}
        held = set(planned)
        last = max([next_step + self.lookahead, *held, *replanned])
        plans = {step: self.split(replanned.get(step)) for step in range(next_step, last + 1) if step not in held}
        self.next_planned = last + 1
        return self.decision, plans

    def split(self, global_batch: int | None = None) -> list[int]:
        """The balancer's split of `global_batch` (default the current B), rank 0's, on every rank."""
        batch = self.batch if global_batch is None else global_batch
        return self.decide(lambda: self.balancer.split(batch), self.balancer.world_size, True)

    def step_trained(self, step: int, global_step: int, compute_s: Sequence[float], rank_batches: Sequence[int],
                     *, overhead_s: float = 0.0) -> dict[int, list[int]]:
        """Step `step` of the epoch (the run's `global_step`) was trained with these measurements, on every rank
        alike: the balancer and a step rule observe them; returns the plan of step + lookahead + 1.
        overhead_s: what the step took beyond the slowest rank's compute (a step rule's cost no split removes)."""
        self.balancer.observe(compute_s, rank_batches)
        rule = self.schedule.rule
        if rule is not None:
            rule.observe(rank_batches, compute_s, overhead_s=overhead_s)
            if global_step >= self.next_decision:
                batch, wait = self.decide(lambda: list(rule.decide(self.batch)), 2, True)
                # The new B is first trained lookahead steps later (those were planned already): the rule's
                # `wait` counts steps at the B it chose.
                self.next_decision = global_step + int(wait) + self.lookahead
                self.rule_batch = int(batch)
        plans = {}
        while self.next_planned <= step + self.lookahead + 1:
            plans[self.next_planned] = self.split()
            self.next_planned += 1
        return plans

    def end_epoch(self, summary: EpochSummary | None) -> None:
        """After an epoch's last step: the balancer's end of epoch; a finished epoch's summary joins the history
        (None: the run stopped inside the epoch, which stays current)."""
        self.balancer.end_epoch()
        if summary is not None:
            self.history.append(summary)
            self.rule_batch = 0

    def state_dict(self) -> dict:
        """What a resumed run needs besides the schedule's and balancer's own state (their owners save those)."""
        return {"history": [dataclasses.asdict(summary) for summary in self.history], "rule_batch": self.rule_batch,
                "next_decision": self.next_decision}

    def load_state_dict(self, state: dict) -> None:
        self.history = [EpochSummary(**summary) for summary in state["history"]]
        self.rule_batch, self.next_decision = int(state["rule_batch"]), int(state["next_decision"])
