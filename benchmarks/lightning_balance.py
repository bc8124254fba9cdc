"""Lightning's Trainer with dynbatch's strategy and an emulated 3x slower rank: the equal split against pid.

    python benchmarks/lightning_balance.py                      # 2 CPU ranks, B = 64, 40 optimizer steps each

Both fits run in one invocation, on the same model and data (examples/lightning_loop.py's Blobs and Classifier).
Compute is emulated (engine/emulation.py): a 1x rank takes exactly --sample-ms per sample plus --step-ms per step,
sleeping what its real compute left; rank 1 has slowdown 3. The equal split then waits for rank 1 every step;
pid moves samples to rank 0. The ceiling is 2x: equal waits 3 x B/2 sample-times a step, the best split [3B/4,
B/4] takes 3B/4.
Throughput: samples / seconds over the steps after --warmup, timed on rank 0 between optimizer steps. Prints both
throughputs and their ratio; writes outputs/benchmarks/lightning_balance.csv (one row per balancer).
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from dynbatch_core.engine.emulation import Emulation  # noqa: E402
from dynbatch_core.integrations.lightning import DynamicBatchesStrategy  # noqa: E402
from lightning_loop import Blobs, BlobsData, Classifier  # noqa: E402

SLOWDOWN = [1.0, 3.0]


class StepTimes(pl.Callback):
    """Rank 0's time at the end of every optimizer step, written to a file the parent reads."""

    def __init__(self, path: Path):
        self.path, self.times = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            self.path.write_text("\n".join(map(repr, self.times)))


class BigBlobs(BlobsData):
    def __init__(self, samples: int):
        super().__init__(workers=0)
        self.dataset = Blobs(size=samples)


def throughput(balancer: str, args, scratch: Path) -> float:
    times = scratch / f"{balancer}.txt"
    strategy = DynamicBatchesStrategy(global_batch=args.batch_size, balancer=balancer, slowdown=SLOWDOWN,
                                      emulation=Emulation(args.sample_ms / 1000, args.step_ms / 1000),
                                      start_method="fork")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[StepTimes(times)])
    trainer.fit(Classifier(), BigBlobs(args.batch_size * args.steps))
    ends = [float(line) for line in times.read_text().split()]
    steady = ends[args.warmup:]
    return (len(steady) - 1) * args.batch_size / (steady[-1] - steady[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch per optimizer step")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per balancer")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the throughput (pid settles)")
    parser.add_argument("--sample-ms", type=float, default=2.0, help="a 1x rank's emulated ms per sample")
    parser.add_argument("--step-ms", type=float, default=1.0, help="and per step")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "lightning_balance.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        results = {balancer: throughput(balancer, args, Path(scratch)) for balancer in ("equal", "pid")}
    ratio = results["pid"] / results["equal"]
    for balancer, samples_per_s in results.items():
        print(f"{balancer:>5}: {samples_per_s:7.1f} samples/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"pid / equal = {ratio:.2f} (ceiling 2.0 for slowdowns {SLOWDOWN})")
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["balancer", "samples_per_s", "ratio_to_equal", "global_batch", "steps", "warmup",
                         "sample_ms", "step_ms", "slowdown"])
        for balancer, samples_per_s in results.items():
            writer.writerow([balancer, f"{samples_per_s:.2f}", f"{samples_per_s / results['equal']:.3f}",
                             args.batch_size, args.steps, args.warmup, args.sample_ms, args.step_ms,
                             " ".join(map(str, SLOWDOWN))])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
