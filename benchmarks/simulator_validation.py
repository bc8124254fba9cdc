"""Records repeated real [1,3] runs of pid and model, the per-step tables notebooks/cluster.ipynb calibrates the
simulator on (repeat 0 of pid) and validates it against (the other repeats):

    python benchmarks/simulator_validation.py --data-dir DIR      # ~3 min on 2 CPU cores (8 runs); quiet machine!

MNIST, resnet8, 2 ranks, rank 1 three times slower (it sleeps 2 x its own compute each step), B = 128, 6 epochs of
2048 samples (96 steps), real compute (no emulation), every run with seed 0: the repeats differ by timing alone.
Writes outputs/benchmarks/simulator_validation_steps.csv (the engine's steps.csv columns plus balancer, repeat)
and prints each run's steady throughput (second half of its steps).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dynbatch_core import RunConfig, run  # noqa: E402
from dynbatch_core.study import analysis  # noqa: E402

OPTIONS = dict(dataset="mnist", model="resnet8", world_size=2, slowdown=(1.0, 3.0), initial_batch=128,
               train_samples=2048, test_samples=200, epochs=6, lr=0.1, seed=0, progress=False, checkpoints=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder with mnist.npz (default: $DYNBATCH_DATA, else the "
                                                         "embedded subset)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "simulator_validation_steps.csv"))
    args = parser.parse_args()
    tables = []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for balancer in ("pid", "model"):   # alternating, so that load hits both alike
                result = run(RunConfig(**OPTIONS, balancer=balancer, data_dir=args.data_dir,
                                       out=os.path.join(folder, f"{balancer}-{repeat}")))
                steady = analysis.steady_throughput(result.steps, after_step=int(result.steps.step.max()) // 2)
                print(f"{balancer} repeat {repeat}: {steady:.0f} samples/s over the second half", flush=True)
                tables.append(result.steps.assign(balancer=balancer, repeat=repeat))
    table = pd.concat(tables, ignore_index=True)
    table[["balancer", "repeat", *[c for c in table.columns if c not in ("balancer", "repeat")]]].to_csv(
        args.out, index=False)
    print(f"{len(table)} rows -> {args.out}")


if __name__ == "__main__":
    main()
