"""Device profiles: how fast a few GPU generations train, relative to each other, and what a rank of each costs.

    costs = mix({"A100 80GB SXM4": 4, "V100 16GB": 2}, reference_sample_s=0.002)   # a tuple of RankCost
    PROFILES["V100 16GB"].relative_speed                                        # 1.0 (the reference)

Sourced (per GPU, one number each): ResNet-50 training throughput in FP32, images per second on one GPU, from
Lambda's published PyTorch benchmark table, lambdal/deeplearning-benchmark, file
pytorch/pytorch-train-throughput-fp32.csv (commit ca7748dbe3d2d2e8f86c3d4d5730c24d8a6a10a0), column resnet50; and
each card's memory as its name in that table states it. A rank's cost per sample c_i is the reference's times
reference throughput / this card's.

Assumed (not measured anywhere, change them for your model): a fixed cost per step the same on every card
(ASSUMED_STEP_S, kernel launches and the optimizer are host-bound), a card at full speed from SATURATION_BATCH
samples (below it a smaller slice is no faster), memory for SAMPLES_PER_GB samples per GB, and timing noise
ASSUMED_CV.

From this project's own runs (not from a public source): "cpu-here", one rank of this 2-core machine training
resnet8 on MNIST (calibration.fit_rank_cost on outputs/benchmarks/heterogeneous_steps.csv's real [1,3] runs, all
four balancers and both ranks pooled, compute_s / k, steps >= 2: a = 9.0 ms, c = 1.01 ms/sample, CV 0.062, 9.3 %
of steps spikes of 1.83x), and "H100 (measured)", the one H100 run (README, On a GPU:
8-10 ms of compute at every B from 16 to 128 with ResNet-18 on MNIST: a = 8 ms, c = 0.018 ms/sample).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .cluster import RankCost

LAMBDA_SOURCE = ("lambdal/deeplearning-benchmark pytorch/pytorch-train-throughput-fp32.csv "
                 "(commit ca7748dbe3d2d2e8f86c3d4d5730c24d8a6a10a0), resnet50 column")
REFERENCE = "V100 16GB"
ASSUMED_STEP_S = 0.010     # assumed: fixed seconds per step on every card
SATURATION_BATCH = 8       # assumed: samples from which a card runs at full speed
SAMPLES_PER_GB = 24        # assumed: samples of the model that fit per GB of memory
ASSUMED_CV = 0.03          # assumed: step-to-step noise of a dedicated GPU


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    images_per_s: float      # ResNet-50 FP32 training, one GPU (sourced)
    memory_gb: float
    source: str

    @property
    def relative_speed(self) -> float:
        return self.images_per_s / PROFILES[REFERENCE].images_per_s


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("Quadro RTX 8000", 274.0, 48.0, LAMBDA_SOURCE),     # Turing, the 2080 Ti's generation
    DeviceProfile("V100 16GB", 369.0, 16.0, LAMBDA_SOURCE),           # "LambdaCloud V100 16GB"
    DeviceProfile("A10", 349.0, 24.0, LAMBDA_SOURCE),                 # "LambdaCloud A10"
    DeviceProfile("RTX 3090", 513.0, 24.0, LAMBDA_SOURCE),
    DeviceProfile("A100 80GB SXM4", 1066.0, 80.0, LAMBDA_SOURCE),
    DeviceProfile("H100 80GB SXM5", 1753.0, 80.0, LAMBDA_SOURCE),
)}

# this project's own measurements (module docstring)
MEASURED: dict[str, RankCost] = {
    "cpu-here": RankCost(a_s=0.0090, c_s=0.00101, cv=0.062, spike_prob=0.093, spike_factor=1.83, name="cpu-here"),
    "H100 (measured)": RankCost(a_s=0.008, c_s=0.000018, cv=ASSUMED_CV, name="H100 (measured)"),
}


def rank_cost(name: str, *, reference_sample_s: float, step_s: float = ASSUMED_STEP_S, cv: float = ASSUMED_CV,
              saturation_batch: int = SATURATION_BATCH, samples_per_gb: float | None = SAMPLES_PER_GB,
              spike_prob: float = 0.0, spike_factor: float = 1.0) -> RankCost:
    """A rank of card `name`: reference_sample_s is the reference card's (V100's) seconds per sample."""
    if name in MEASURED:
        return MEASURED[name]
    if name not in PROFILES:
        raise ValueError(f"unknown device {name!r}; known: {', '.join([*PROFILES, *MEASURED])}")
    profile = PROFILES[name]
    memory = None if samples_per_gb is None else max(1, int(profile.memory_gb * samples_per_gb))
    return RankCost(a_s=step_s, c_s=reference_sample_s / profile.relative_speed, cv=cv, spike_prob=spike_prob,
                    spike_factor=spike_factor, saturation_batch=saturation_batch, memory_batch=memory, name=name)


def mix(counts: Mapping[str, int], **options) -> tuple[RankCost, ...]:
    """Ranks of several cards, in the order given: {"A100 80GB SXM4": 4, "V100 16GB": 2} -> 6 RankCosts."""
    if any(count < 0 for count in counts.values()) or sum(counts.values()) < 1:
        raise ValueError(f"device counts must be >= 0 with at least one rank, got {dict(counts)}")
    return tuple(rank for name, count in counts.items() for rank in [rank_cost(name, **options)] * count)


def profile_table():
    """The profiles as a table (name, images/s, relative speed, memory, source), the notebook's and README's."""
    import pandas as pd
    return pd.DataFrame([{"device": p.name, "resnet50_images_per_s": p.images_per_s,
                          "relative_speed": round(p.relative_speed, 3), "memory_gb": p.memory_gb,
                          "source": "Lambda benchmark (sourced)"} for p in PROFILES.values()]
                        + [{"device": name, "resnet50_images_per_s": None, "relative_speed": None, "memory_gb": None,
                            "source": "this project's runs"} for name in MEASURED])
