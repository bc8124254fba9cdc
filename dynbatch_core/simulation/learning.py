"""Training progress without a model: the McCandlish et al. (2018) trade-off between steps and samples.

    curve = LearningCurve(critical_batch=512, min_steps=2000)
    curve.progress(global_batch=256)            # optimal steps one step at B = 256 is worth: 1 / (1 + B_crit / B)
    curve.loss(progress=1500.0)                 # a loss that falls with progress (its shape is assumed)

A run at a fixed B needs S(B) = S_min (1 + B_crit / B) steps to reach a target (critical_batch.py fits exactly this
from a sweep of static runs), so each step at B moves a run 1 / (1 + B_crit / B) of an optimal step towards it;
the target is reached when the optimal steps add up to min_steps. Per-rank balancing does not enter: the update of
an exact uneven split is the union batch's. The loss L = final + (initial - final) exp(-3 progress / S_min) is an
assumed shape, there only for schedules that decide from the loss (loss-plateau); samples and time to the target
are what a simulated schedule is judged by.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LearningCurve:
    critical_batch: float = 1024.0   # B_crit = E_min / S_min, samples
    min_steps: float = 2000.0        # S_min: optimal steps to the target (at B >> B_crit)
    initial_loss: float = 2.3        # assumed shape of the loss (ln 10: a 10-class problem at chance)
    final_loss: float = 0.1

    def __post_init__(self):
        if not self.critical_batch > 0 or not self.min_steps > 0 or not self.initial_loss > self.final_loss:
            raise ValueError(f"learning curve {self}: needs critical_batch > 0, min_steps > 0 and "
                             "initial_loss > final_loss")

    def progress(self, global_batch: int) -> float:
        return 1.0 / (1.0 + self.critical_batch / global_batch)

    def loss(self, progress: float) -> float:
        return self.final_loss + (self.initial_loss - self.final_loss) * math.exp(-3.0 * progress / self.min_steps)

    def reached(self, progress: float) -> bool:
        return progress >= self.min_steps
