"""Records the engine's per-step splits on emulated costs, outputs/benchmarks/engine_splits.csv: the table
tests/test_simulation.py and notebooks/cluster.ipynb compare the simulator with. Rerun it when the engine's
decisions are meant to change:

    python benchmarks/record_engine_splits.py        # from the repo root, ~1.5 min on 2 CPU cores

Each scenario runs every balancer on an emulated clock (--emulated-sample-ms 2, --emulated-step-ms 5,
--skip-emulated-sleep: a rank's compute is exactly (5 ms + b x 2 ms) x k), 3 epochs of 1000 samples at B = 64
(15 full steps and a short one per epoch). Only the columns the simulator must reproduce are kept.
"""
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dynbatch_core import RunConfig, run  # noqa: E402

SCENARIOS = {"[1,3]": (1.0, 3.0), "[1,1,2,4]": (1.0, 1.0, 2.0, 4.0)}
BALANCERS = ("equal", "dbs", "pid", "model")
OPTIONS = dict(dataset="synthetic", model="resnet8", epochs=3, train_samples=1000, test_samples=32,
               initial_batch=64, emulated_sample_ms=2.0, emulated_step_ms=5.0, skip_emulated_sleep=True,
               progress=False, checkpoints=False)
KEPT = ["scenario", "balancer", "epoch", "step", "rank", "rank_batch", "global_batch", "slowdown", "compute_s"]


def record(folder: Path) -> pd.DataFrame:
    tables = []
    for scenario, slowdown in SCENARIOS.items():
        for balancer in BALANCERS:
            result = run(RunConfig(**OPTIONS, world_size=len(slowdown), slowdown=slowdown, balancer=balancer,
                                   out=str(folder / f"{balancer}-{len(slowdown)}")))
            tables.append(result.steps.assign(scenario=scenario, balancer=balancer)[KEPT])
    return pd.concat(tables, ignore_index=True)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        table = record(Path(tmp))
    target = ROOT / "outputs" / "benchmarks" / "engine_splits.csv"
    table.to_csv(target, index=False)
    print(f"{len(table)} rows -> {target}")
