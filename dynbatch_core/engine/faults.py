"""Failure injection, a hook for the reliability tests only: it does nothing unless two variables are set.

    DYNBATCH_TEST_HOOKS=1 DYNBATCH_FAULT=kill:1:23 python -m dynbatch_core train ...

DYNBATCH_FAULT alone is ignored (with a warning), so a stray variable in a user's environment can never fire it.
Kinds ("KIND:RANK:WHEN"):
    raise:R:S         rank R raises just before global step S
    kill:R:S          rank R SIGKILLs itself just before global step S
    hang:R:S          rank R sleeps for ever just before global step S (collectives then time out)
    stall:R:E:SECONDS rank R sleeps SECONDS at the start of epoch E, after the epoch's decision and before its
                      timer starts: the other ranks wait for it inside their timed epoch, so the ranks measure
                      different epoch times (as a slow filesystem on one node does)
    nonfinite:R:S     at global step S, rank R's squared gradient norm and the step's global one reach the noise
                      estimator as inf on every rank: what a float16 step whose loss scale overflowed reports (the
                      update itself is left alone; GradScaler would skip it)
A fault fires in the first attempt only (a torchrun restart is clean).
"""
from __future__ import annotations

import os
import signal
import time
import warnings
from dataclasses import dataclass

FAULT_VARIABLE = "DYNBATCH_FAULT"
SWITCH_VARIABLE = "DYNBATCH_TEST_HOOKS"
STEP_KINDS = ("raise", "kill", "hang")
POINT_KINDS = ("nonfinite",)


@dataclass(frozen=True)
class InjectedFault:
    kind: str | None = None
    rank: int = -1
    when: int = -1          # the global step (raise, kill, hang) or the epoch (stall)
    seconds: float = 0.0    # stall only

    @classmethod
    def from_env(cls) -> "InjectedFault":
        spec = os.environ.get(FAULT_VARIABLE)
        if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            return cls()
        if os.environ.get(SWITCH_VARIABLE) != "1":
            warnings.warn(f"{FAULT_VARIABLE} is set but ignored: it is a test hook, active only with "
                          f"{SWITCH_VARIABLE}=1", stacklevel=2)
            return cls()
        parts = spec.split(":")
        if parts[0] in STEP_KINDS + POINT_KINDS and len(parts) == 3:
            return cls(parts[0], int(parts[1]), int(parts[2]))
        if parts[0] == "stall" and len(parts) == 4:
            return cls("stall", int(parts[1]), int(parts[2]), float(parts[3]))
        raise ValueError(f"{FAULT_VARIABLE}={spec!r}: expected raise|kill|hang|nonfinite:RANK:STEP or stall:RANK:EPOCH:SECONDS")

    def before_step(self, rank: int, step: int) -> None:
        if self.kind not in STEP_KINDS or (rank, step) != (self.rank, self.when):
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "hang":
            time.sleep(10**6)
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")

    def before_epoch(self, rank: int, epoch: int) -> None:
        if self.kind == "stall" and (rank, epoch) == (self.rank, self.when):
            time.sleep(self.seconds)

    def noise_points(self, step: int, points: list[tuple[int, float]] | None, rank_batches: list[int]
                     ) -> list[tuple[int, float]] | None:
        """The step's noise points (step.StepResult.noise_points), overflowed at the nonfinite fault's step."""
        if self.kind != "nonfinite" or step != self.when or points is None:
            return points
        with_samples = [rank for rank, batch in enumerate(rank_batches) if batch > 0]   # the points' ranks, in order
        overflowed = {len(points) - 1} | ({with_samples.index(self.rank)} if self.rank in with_samples else set())
        return [(batch, float("inf") if index in overflowed else norm) for index, (batch, norm) in enumerate(points)]
