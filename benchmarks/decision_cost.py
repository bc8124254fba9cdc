"""What one balancer decision costs per step (split + observe) against the number of ranks, new and old code.

    python benchmarks/decision_cost.py                         # N = 8..1024, every balancer, new and old: ~3 min
    python benchmarks/decision_cost.py --sizes 1024 --only new  # the new code alone at 1024 ranks (seconds)
    python benchmarks/decision_cost.py --profile model --sizes 1024 --only new   # + cProfile of that balancer
    python benchmarks/decision_cost.py --replot                  # redraw the figure from the CSV

Setup (the same for every balancer, the new code and the old one): N ranks in two speed classes, half at 1x and half
at 3x, each with its own affine step time t_i(b) = k_i (a_i + c_i b) (a_i ~ 10 ms, c_i ~ 1 ms per sample, +-10 % per
rank), times drawn with 5 % log-normal noise; global batch B = 32 N + 7 (so that every split must round);
end_epoch() every 20 steps. --warmup steps run untimed, then --steps steps are timed one by one: split(B) and
observe(compute_s, split) between two perf_counter() calls. Median and 90th percentile in ms per step.
"old" is tests/reference_balancers.py, the frozen implementation before the O(n log n) rewrite, driven with the same
measurements; every split of the old code is checked to equal the new code's (the run stops if one differs).
Writes outputs/benchmarks/decision_cost.csv and decision_cost.png (log-log cost vs N, old dashed); prints the table.
"""
from __future__ import annotations

import argparse
import cProfile
import importlib.util
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dynbatch_core.batching.balancers import BALANCERS, build_balancer  # noqa: E402

SEED = 0                  # numpy default_rng seed of the step times (one stream per balancer and N)
SLOWDOWNS = (1.0, 3.0)    # the two speed classes, half of the ranks each
FIXED_S = 0.010           # seconds per step of a 1x rank, whatever the batch
PER_SAMPLE_S = 0.001      # seconds per sample of a 1x rank
RANK_SPREAD = 0.10        # each rank's a_i and c_i drawn within +-10 % of the above
NOISE = 0.05              # sigma of the log-normal noise on every step time
EPOCH_STEPS = 20          # end_epoch() after every 20th step
SAMPLES_PER_RANK = 32     # B = 32 N + 7


def load_reference():
    """tests/reference_balancers.py, imported by path (tests/ is no package)."""
    path = ROOT / "tests" / "reference_balancers.py"
    spec = importlib.util.spec_from_file_location("reference_balancers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Cluster:
    """The simulated ranks: per-rank lines and the noise stream, the same for every implementation."""

    def __init__(self, world_size: int, seed: int):
        rng = np.random.default_rng(seed)
        slowdown = np.where(np.arange(world_size) < world_size // 2, SLOWDOWNS[0], SLOWDOWNS[1])
        self.fixed_s = slowdown * FIXED_S * rng.uniform(1 - RANK_SPREAD, 1 + RANK_SPREAD, world_size)
        self.per_sample_s = slowdown * PER_SAMPLE_S * rng.uniform(1 - RANK_SPREAD, 1 + RANK_SPREAD, world_size)
        self.rng = rng

    def compute_s(self, split: list[int]) -> list[float]:
        noise = np.exp(NOISE * self.rng.standard_normal(len(split)))
        return ((self.fixed_s + self.per_sample_s * np.asarray(split)) * noise).tolist()


def time_steps(balancer, world_size: int, warmup: int, steps: int, seed: int) -> tuple[list[float], list]:
    """ms per timed step, and every split (warm-up included)."""
    cluster, global_batch = Cluster(world_size, seed), SAMPLES_PER_RANK * world_size + 7
    costs_ms, splits = [], []
    for step in range(warmup + steps):
        started = time.perf_counter()
        split = balancer.split(global_batch)
        split_s = time.perf_counter() - started
        compute_s = cluster.compute_s(split)   # not timed: the simulated training step
        started = time.perf_counter()
        balancer.observe(compute_s, split)
        observe_s = time.perf_counter() - started
        if (step + 1) % EPOCH_STEPS == 0:
            balancer.end_epoch()
        splits.append(split)
        if step >= warmup:
            costs_ms.append(1e3 * (split_s + observe_s))
    return costs_ms, splits


def plot(table: pd.DataFrame, path: Path) -> None:
    """Log-log median ms per step vs N, one line per balancer, the old code dashed, the targets dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sizes = sorted(table["world_size"].unique())
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        sns.lineplot(table, x="world_size", y="median_ms", hue="balancer", style="implementation",
                     style_order=["new", "old"], dashes={"new": "", "old": (4, 2)}, markers=True, ax=ax)
        ax.set(xscale="log", yscale="log", xlabel="ranks N", ylabel="median ms per step (split + observe)",
               title=f"Balancer decision cost, B = 32 N + 7, {table['steps'].iloc[0]} steps, old dashed")
        ax.set_xticks(sizes, [str(size) for size in sizes])
        for target_ms, label in ((1.0, "target 1 ms (equal, weights, dbs, pid)"), (5.0, "target 5 ms (model)")):
            ax.axhline(target_ms, color="grey", linewidth=0.8, linestyle=":")
            ax.annotate(label, (sizes[0], target_ms), textcoords="offset points", xytext=(2, 3),
                        fontsize="x-small", color="grey")
        ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128, 512, 1024], help="world sizes N")
    parser.add_argument("--balancers", nargs="+", default=list(BALANCERS), choices=list(BALANCERS))
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--only", choices=("new", "old"), help="time one implementation only")
    parser.add_argument("--profile", choices=list(BALANCERS), help="cProfile this balancer's new code, per N")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from the CSV in --out")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"))
    args = parser.parse_args()
    if args.replot:
        plot(pd.read_csv(Path(args.out) / "decision_cost.csv"), Path(args.out) / "decision_cost.png")
        return
    reference = load_reference()
    builders = {"new": build_balancer, "old": reference.build_balancer}
    implementations = [args.only] if args.only else ["new", "old"]

    rows = []
    for world_size in args.sizes:
        for name in args.balancers:
            options = {"rank_weights": [3.0 if rank < world_size // 2 else 1.0 for rank in range(world_size)]}
            seed = SEED + 1000 * world_size + list(BALANCERS).index(name)
            splits = {}
            for implementation in implementations:
                balancer = builders[implementation](name, world_size, **options)
                profiler = cProfile.Profile() if implementation == "new" and args.profile == name else None
                if profiler:
                    profiler.enable()
                costs_ms, splits[implementation] = time_steps(balancer, world_size, args.warmup, args.steps, seed)
                if profiler:
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
                rows.append({"implementation": implementation, "balancer": name, "world_size": world_size,
                             "median_ms": float(np.median(costs_ms)), "p90_ms": float(np.percentile(costs_ms, 90)),
                             "max_ms": float(np.max(costs_ms)), "steps": args.steps})
            if len(splits) == 2 and splits["new"] != splits["old"]:
                step = next(i for i, (a, b) in enumerate(zip(splits["new"], splits["old"])) if a != b)
                raise SystemExit(f"{name} at N={world_size}: the new split differs from the old at step {step}")
            print(f"N={world_size:5d} {name:8s} " + "  ".join(
                f"{row['implementation']} median {row['median_ms']:8.3f} ms p90 {row['p90_ms']:8.3f} ms"
                for row in rows[-len(implementations):]) + ("  (splits identical)" if len(splits) == 2 else ""),
                flush=True)
    table = pd.DataFrame(rows)
    wide = table.pivot_table(index=["balancer", "world_size"], columns="implementation",
                             values=["median_ms", "p90_ms"]).round(3)
    wide.columns = [f"{implementation}_{what}" for what, implementation in wide.columns]
    print(wide.to_string())
    if args.only or args.profile:
        return   # a partial run: no table or figure replaced
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "decision_cost.csv", index=False)
    plot(table, out / "decision_cost.png")
    print(f"wrote {out / 'decision_cost.csv'} and {out / 'decision_cost.png'}")


if __name__ == "__main__":
    main()
