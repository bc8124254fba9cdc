"""Learning-rate rules: scaling with the global batch, warm-up after the batch grows, decay over training.

    lr = scaled_lr(0.05, global_batch=128, initial_batch=64, scaling="linear")         # 0.1
    lr = warmup_lr(previous_lr=0.05, target_lr=0.1, steps_since_change=0, warmup_steps=5)  # 0.06
    lr *= decay_factor("cosine", samples_seen=4096, total_samples=16384)

Decay is measured in samples, not steps, so it means the same thing whatever batch-size schedule is running.
"""
from __future__ import annotations

import math

LR_SCALINGS = ("none", "linear", "sqrt", "adascale")
LR_DECAYS = ("none", "cosine")


def scaled_lr(base_lr: float, global_batch: int, initial_batch: int, scaling: str) -> float:
    """The learning rate for `global_batch` when `base_lr` was tuned for `initial_batch`."""
    ratio = global_batch / initial_batch
    if scaling == "linear":
        return base_lr * ratio
    if scaling == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr   # none; adascale multiplies in its measured gain per step (adascale_gain)


def adascale_gain(noise_scale: float, global_batch: int, initial_batch: int) -> float:
    """AdaScale's gain r = (S/B_0 + |G|^2) / (S/B + |G|^2) = (B_simple/B_0 + 1) / (B_simple/B + 1) (Johnson et al.
    2020): between 1 (no noise: a larger batch buys nothing) and B/B_0 (all noise: linear scaling). Pure noise
    (B_simple = +inf, the smoothed |G|^2 not positive while the trace is): B/B_0, the limit. Before the noise scale
    is known (NaN), or when it is not positive (the trace estimate is not): 1."""
    if noise_scale == math.inf:
        return global_batch / initial_batch
    if not noise_scale > 0:
        return 1.0
    return (noise_scale / initial_batch + 1.0) / (noise_scale / global_batch + 1.0)


def warmup_lr(previous_lr: float, target_lr: float, steps_since_change: int, warmup_steps: int) -> float:
    """Linear ramp from the old to the new learning rate over `warmup_steps` steps after B grew."""
    if warmup_steps <= 0 or steps_since_change >= warmup_steps or target_lr <= previous_lr:
        return target_lr
    return previous_lr + (target_lr - previous_lr) * (steps_since_change + 1) / warmup_steps


def decay_factor(decay: str, samples_seen: int, total_samples: int) -> float:
    """Multiplier on the learning rate after `samples_seen` of the run's `total_samples`."""
    if decay == "cosine":
        progress = min(1.0, samples_seen / max(1, total_samples))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0
