"""Emulated heterogeneity and emulated hardware: how many times slower each rank is at each step, and what a step
costs when its compute is emulated rather than measured.

    plan = SlowdownPlan.from_options(world_size=2, slowdown=(1, 3))              # rank 1 is 3x slower throughout
    plan = SlowdownPlan.from_options(world_size=2, trace="0:1,1;100:1,3;200:1,1")  # rank 1 slows at step 100, recovers at 200
    plan = SlowdownPlan.from_options(world_size=2, trace="trace.csv")            # CSV columns: step,k_0,...,k_{n-1}
    plan.factor(rank=1, step=150)                                               # -> 3.0

    emulation = Emulation(sample_s=0.004, step_s=0.010)   # a 1x rank's step takes exactly 10 ms + b x 4 ms
    compute_s = take_emulated_delay(measured_s, batch=32, slowdown=3.0, emulation=emulation)   # sleeps, -> 0.414

A factor k makes the rank sleep (k - 1) times its own measured compute time each step (see step.train_step), so
the delay scales with that rank's batch size and never includes time spent waiting for other ranks. With an
Emulation the rank instead takes exactly (step_s + b x sample_s) x k, sleeping whatever its real compute left over,
and reports that: balancer decisions then no longer depend on timing noise, and the fixed per-step cost makes the
step time affine in b, as on real hardware. A trace row holds from its step (0-based global step) until the next
row.
"""
from __future__ import annotations

import bisect
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class SlowdownPlan:
    change_steps: tuple[int, ...]                 # sorted global steps at which the factors change (first is 0)
    factors: tuple[tuple[float, ...], ...]        # factors[j][rank] holds from change_steps[j]

    @classmethod
    def from_options(cls, world_size: int, slowdown: Sequence[float] | None = None,
                     trace: str | None = None) -> "SlowdownPlan":
        if slowdown is not None and trace is not None:
            raise ValueError("give either --slowdown or --slowdown-trace, not both")
        if trace is not None:
            rows = _read_trace(trace)
        else:
            rows = [(0, tuple(slowdown) if slowdown is not None else (1.0,) * world_size)]
        steps = [step for step, _ in rows]
        if any(step < 0 for step in steps) or len(set(steps)) != len(steps):
            raise ValueError(f"slowdown trace steps must be distinct and >= 0, got {steps}")
        for step, factors in rows:
            if len(factors) != world_size:
                raise ValueError(f"slowdown trace row at step {step} has {len(factors)} factors, "
                                 f"expected {world_size} (one per rank)")
            if any(not 1.0 <= k < math.inf for k in factors):
                raise ValueError(f"slowdown factors must be >= 1 (1 = full speed), got {list(factors)} at step {step}")
        rows.sort(key=lambda row: row[0])
        if rows[0][0] != 0:
            rows.insert(0, (0, (1.0,) * world_size))
        return cls(tuple(step for step, _ in rows), tuple(tuple(map(float, f)) for _, f in rows))

    def factor(self, rank: int, step: int) -> float:
        return self.factors[bisect.bisect_right(self.change_steps, step) - 1][rank]

    def factors_at(self, step: int) -> tuple[float, ...]:
        return self.factors[bisect.bisect_right(self.change_steps, step) - 1]


@dataclass(frozen=True)
class Emulation:
    """Emulated compute (--emulated-sample-ms, --emulated-step-ms, --skip-emulated-sleep)."""
    sample_s: float          # a 1x rank's seconds per sample
    step_s: float = 0.0      # and per step, on top
    sleep: bool = True       # False: report the emulated cost without waiting for it (runs at full speed)

    @classmethod
    def from_ms(cls, sample_ms: float | None, step_ms: float | None = None, *, sleep: bool = True
                ) -> "Emulation | None":
        """From the config's milliseconds; None when compute is measured (sample_ms None)."""
        return None if sample_ms is None else cls(sample_ms / 1000, (step_ms or 0.0) / 1000, sleep)

    def cost_s(self, batch: int, slowdown: float) -> float:
        return (self.step_s + batch * self.sample_s) * slowdown


def take_emulated_delay(compute_s: float, batch: int, slowdown: float, emulation: Emulation | None = None, *,
                        elapsed_s: float | None = None) -> float:
    """Sleep so that this rank looks `slowdown` times slower (or takes exactly the emulated cost); returns the
    compute seconds to report. Call it when forward and backward are done, before the reduction.

    elapsed_s: the wall seconds since the step started, time spent waiting for other ranks included, where ranks
    run in lock-step inside the step (FSDP2's per-block all-gathers): a rank with a small slice then waits for the
    others' compute before it reaches this point, and a delay of (target - its own compute) on top would start only
    after theirs had ended. So the rank sleeps until the step is `target` seconds old instead: it finishes when a
    device that slow would have."""
    if emulation is not None:
        target_s = emulation.cost_s(batch, slowdown)
        if emulation.sleep:
            time.sleep(max(0.0, target_s - (compute_s if elapsed_s is None else elapsed_s)))
        return target_s
    if slowdown > 1.0:
        # The delay is this rank's own compute times (k - 1): it scales with its batch and never includes waiting.
        time.sleep((slowdown - 1.0) * compute_s if elapsed_s is None else max(0.0, slowdown * compute_s - elapsed_s))
    return compute_s * max(slowdown, 1.0)


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:   # an inline trace of 1000s of ranks is longer than a file name may be
        return False


def _read_trace(trace: str) -> list[tuple[int, tuple[float, ...]]]:
    """Rows (step, factors) from a CSV file or an inline spec "step:k0,k1;step:k0,k1"."""
    is_file = _is_file(trace)
    if ":" not in trace and not is_file:
        raise ValueError(f"--slowdown-trace {trace!r}: no such file; expected a CSV file with rows step,k_0,...,k_n-1 "
                         "or an inline spec like '0:1,1;100:1,3'")
    try:
        if is_file:
            with open(trace, newline="") as handle:
                lines = [row for row in csv.reader(handle) if row and not row[0].strip().startswith("#")]
            if lines and not lines[0][0].strip().lstrip("-").isdigit():
                lines = lines[1:]  # header
            return [(int(row[0]), tuple(float(k) for k in row[1:])) for row in lines]
        rows = []
        for part in trace.split(";"):
            step, factors = part.split(":")
            rows.append((int(step), tuple(float(k) for k in factors.split(","))))
        return rows
    except (ValueError, IndexError) as error:
        raise ValueError(f"--slowdown-trace {trace!r}: expected a CSV file with rows step,k_0,...,k_n-1 or an "
                         f"inline spec like '0:1,1;100:1,3' ({error})") from None
