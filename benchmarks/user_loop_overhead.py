"""What DynamicBatches (the object for a user's own loop) costs against the plain loop, on DDP and on FSDP2.

    python benchmarks/user_loop_overhead.py                      # resnet20, global batch 64, 2 ranks, 10 rounds
    python benchmarks/user_loop_overhead.py --profile            # + cProfile of rank 0, per loop, to a .txt
    python benchmarks/user_loop_overhead.py --slowdown-race --race-syncs fsdp ddp   # [1,3]: equal vs pid, ~7 min

Four loops run in the same processes (gloo, threads = cores // ranks), on the same data, model and global batch,
in rounds whose order rotates through ORDERS (each object loop next to its plain loop, first in half the rounds, each
pair first in half: drift in machine load hits all alike); each round trains --steps steps of each loop, timed
between two dist.barrier() calls:
  plain DDP              DistributedSampler + DataLoader + stock DistributedDataParallel, mean loss
  DynamicBatches DDP     DynamicBatches(balancer="equal") + prepare(model, optimizer) + step.scale(mean loss)
  plain FSDP2            shard_per_block (fully_shard per block and root) + DistributedSampler, FSDP2's mean
  DynamicBatches FSDP2   the object with prepare(shard_per_block(model), optimizer)
A round is one epoch of each loop, left after --steps steps; the object's last step is measured (its exchange of
compute times, batches and losses) by batches.state_dict() inside the timed span, as the next step would.
Prints samples/s per round, each object loop's ratio to its plain loop (median and range over rounds); writes
outputs/benchmarks/user_loop_overhead.csv and .png.

--slowdown-race: rank 1 three times slower (emulated: a 1x rank takes exactly --emulated-sample-ms per sample,
sleeping what its real compute left), resnet8, B=128, equal and pid trained in one invocation through
dynbatch_core.run for each of --race-syncs (default fsdp); steady samples/s over the second half of the steps;
writes outputs/benchmarks/heterogeneous-fsdp/slowdown_race-SYNCS-MSms.csv.
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import io
import os
import pstats
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dynbatch_core import DynamicBatches, RunConfig, run  # noqa: E402
from dynbatch_core.data import collate_batch, load_datasets  # noqa: E402
from dynbatch_core.engine.distributed import (LoopbackStore, exit_without_teardown, init_process_group,  # noqa: E402
                                              threads_per_rank)
from dynbatch_core.engine.fsdp import shard_per_block  # noqa: E402
from dynbatch_core.models import build_model  # noqa: E402

LOOPS = ("plain DDP", "DynamicBatches DDP", "plain FSDP2", "DynamicBatches FSDP2")
PLAIN_OF = {"DynamicBatches DDP": "plain DDP", "DynamicBatches FSDP2": "plain FSDP2"}
ORDERS = [(0, 1, 2, 3), (3, 2, 1, 0), (1, 0, 3, 2), (2, 3, 0, 1)]   # indices into LOOPS, one per round in turn
LR, MOMENTUM = 0.05, 0.9   # SGD, at the global batch (the object's linear LR scaling keeps it: B never changes)


class PlainLoop:
    """DistributedSampler + DataLoader, each rank's mean loss; the model is stock DDP or FSDP2 (mean reductions)."""

    def __init__(self, model, dataset, world_size: int, global_batch: int):
        self.model, self.dataset, self.rank_batch = model, dataset, global_batch // world_size
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def train(self, epoch: int, steps: int) -> None:
        sampler = DistributedSampler(self.dataset, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_size=self.rank_batch, sampler=sampler, collate_fn=collate_batch)
        for _, (images, labels) in zip(range(steps), loader):   # range first: zip then reads no extra batch
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(images), labels).backward()
            self.optimizer.step()


class ObjectLoop:
    """The user's loop of dynamic_batches.py's docstring, with the equal split."""

    def __init__(self, model, dataset, global_batch: int):
        self.batches = DynamicBatches(dataset, global_batch=global_batch, balancer="equal",
                                      collate_fn=collate_batch, num_workers=0)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        self.model = self.batches.prepare(model, self.optimizer)

    def train(self, epoch: int, steps: int) -> None:
        for _, ((images, labels), step) in zip(range(steps), self.batches.epoch(epoch)):
            loss = step.scale(F.cross_entropy(self.model(images), labels))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.batches.state_dict()   # measures the last step handed out, as the next one would


def build_loops(args, dataset, world_size: int) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model, in_channels=1, num_classes=10)   # one initialisation, four copies
    return {"plain DDP": PlainLoop(DistributedDataParallel(copy.deepcopy(model)), dataset, world_size, args.batch_size),
            "DynamicBatches DDP": ObjectLoop(copy.deepcopy(model), dataset, args.batch_size),
            "plain FSDP2": PlainLoop(shard_per_block(copy.deepcopy(model)), dataset, world_size, args.batch_size),
            "DynamicBatches FSDP2": ObjectLoop(shard_per_block(copy.deepcopy(model)), dataset, args.batch_size)}


def timed(loop, epoch: int, steps: int, profile: cProfile.Profile | None) -> float:
    dist.barrier()
    started = time.perf_counter()
    if profile is not None:
        profile.enable()
    loop.train(epoch, steps)
    if profile is not None:
        profile.disable()
    dist.barrier()
    return time.perf_counter() - started


def worker(rank: int, args, address: str, results) -> None:
    torch.set_num_threads(threads_per_rank(args.world_size))
    init_process_group("cpu", rank, args.world_size, address, timeout_s=300)
    # the epoch is left after --steps steps: hold more than one round's samples so that no rank runs short
    train, _, _ = load_datasets("mnist", data_dir=args.data_dir, train_samples=args.steps * args.batch_size * 2,
                                test_samples=100)
    loops = build_loops(args, train, args.world_size)
    profiles = {loop: cProfile.Profile() for loop in LOOPS} if args.profile and rank == 0 else {}
    for loop in loops.values():   # untimed warm-up, epoch 0 (allocator, thread pools, DDP bucket rebuild)
        timed(loop, 0, 5, None)
    rows = []
    for round_index in range(args.rounds):
        for position, index in enumerate(ORDERS[round_index % len(ORDERS)]):
            seconds = timed(loops[LOOPS[index]], round_index + 1, args.steps, profiles.get(LOOPS[index]))
            rows.append({"round": round_index, "position": position, "loop": LOOPS[index], "seconds": seconds,
                         "samples_per_s": args.steps * args.batch_size / seconds, "load_1min": os.getloadavg()[0]})
    if rank == 0:
        results.put({"rows": rows, "profiles": {name: profile_text(profile, args.steps * args.rounds)
                                                for name, profile in profiles.items()}})
    dist.destroy_process_group()
    exit_without_teardown(0)


def profile_text(profile: cProfile.Profile, steps: int) -> str:
    stream = io.StringIO()
    stream.write(f"{steps} timed steps on rank 0\n")
    stats = pstats.Stats(profile, stream=stream).sort_stats("cumulative")
    stats.print_stats(30)
    stats.print_stats("dynbatch_core|distributed_c10d|dataloader")   # the object's own work and the collectives
    return stream.getvalue()


def overhead(args) -> None:
    results = mp.get_context("spawn").SimpleQueue()
    store = LoopbackStore()  # kept alive while the ranks run
    mp.spawn(worker, args=(args, store.address, results), nprocs=args.world_size, join=True)
    found = results.get()
    table = pd.DataFrame(found["rows"])
    wide = table.pivot(index="round", columns="loop", values="samples_per_s")[list(LOOPS)]
    print(wide.to_string(float_format=lambda v: f"{v:.1f}"))
    ratios = {}
    for loop, plain in PLAIN_OF.items():
        ratios[loop] = ratio = wide[loop] / wide[plain]
        print(f"{loop} / {plain}: median {ratio.median():.3f} (range {ratio.min():.3f}-{ratio.max():.3f})")
    setting = (f"{args.world_size} ranks x {threads_per_rank(args.world_size)} thread(s), {args.model}, MNIST, "
               f"global batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps")
    print(setting)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.assign(world_size=args.world_size, model=args.model, global_batch=args.batch_size,
                 steps=args.steps).to_csv(out / "user_loop_overhead.csv", index=False)
    for name, text in found["profiles"].items():
        path = out / f"user_loop_overhead_profile-{name.replace(' ', '-')}.txt"
        path.write_text(text)
        print(f"wrote {path}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    ratio_table = pd.DataFrame([{"round": index, "comparison": f"{loop} / {PLAIN_OF[loop]}", "ratio": value}
                                for loop, series in ratios.items() for index, value in series.items()])
    with sns.axes_style("whitegrid"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        sns.barplot(table, x="round", y="samples_per_s", hue="loop", hue_order=list(LOOPS), ax=left)
        left.set(xlabel="round (order rotates, same processes)", ylabel="throughput (samples/s)",
                 ylim=(0, 1.4 * table["samples_per_s"].max()))
        left.legend(fontsize="small", ncol=2, loc="upper left")
        sns.lineplot(ratio_table, x="round", y="ratio", hue="comparison", marker="o", ax=right)
        right.axhline(0.97, color="grey", linestyle="--", linewidth=1, label="target 0.97")
        right.set(xlabel="round", ylabel="object / plain samples/s")
        right.legend(fontsize="small")
        fig.suptitle(f"DynamicBatches in a user's loop vs the plain loop: {setting}\n" + ", ".join(
            f"{loop} / plain: median {ratio.median():.3f}" for loop, ratio in ratios.items()), fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "user_loop_overhead.png", dpi=120)


def slowdown_race(args) -> None:
    """Equal vs pid with rank 1 three times slower, one run each through dynbatch_core.run, per gradient path."""
    rows = []
    for sync in args.race_syncs:
        for balancer in ("equal", "pid"):
            started = time.perf_counter()
            result = run(RunConfig(
                dataset="mnist", data_dir=args.data_dir, model="resnet8", world_size=2, threads=1,
                gradient_sync=sync, initial_batch=128, train_samples=args.race_samples, epochs=args.race_epochs,
                test_samples=500, balancer=balancer, slowdown=(1.0, 3.0), emulated_sample_ms=args.emulated_sample_ms,
                lr=0.1, out=str(ROOT / "runs" / "benchmarks" / "heterogeneous-fsdp" / f"{sync}-{balancer}"),
                overwrite=True, progress=False, timeout_s=120.0))
            steps = result.steps
            # a step lasts its slowest rank's compute + wait; steady: the second half of the steps
            per_step = steps.assign(step_s=steps["compute_s"] + steps["wait_s"]).groupby("step").agg(
                step_s=("step_s", "max"), global_batch=("global_batch", "first"))
            steady = per_step[per_step.index > per_step.index.max() // 2]
            last = steps[steps["step"] == steps["step"].max()].sort_values("rank")
            epochs = result.epochs
            rows.append({"gradient_sync": sync, "balancer": balancer, "sample_ms": args.emulated_sample_ms,
                         "steps": len(per_step), "final_split": "/".join(str(b) for b in last["rank_batch"]),
                         "steady_samples_per_s": steady["global_batch"].sum() / steady["step_s"].sum(),
                         "late_epochs_samples_per_s": epochs["samples_per_s"].iloc[len(epochs) // 2:].mean(),
                         "test_acc": epochs["test_acc"].iloc[-1], "wall_s": time.perf_counter() - started})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for sync, runs in table.groupby("gradient_sync", sort=False):
        pid, equal = runs.set_index("balancer").loc["pid"], runs.set_index("balancer").loc["equal"]
        print(f"{sync}: pid / equal steady {pid.steady_samples_per_s / equal.steady_samples_per_s:.3f}, late epochs "
              f"{pid.late_epochs_samples_per_s / equal.late_epochs_samples_per_s:.3f} (ceiling 2.0, target >= 1.8)")
    out = Path(args.out) / "heterogeneous-fsdp"
    out.mkdir(parents=True, exist_ok=True)
    name = f"slowdown_race-{'-'.join(args.race_syncs)}-{args.emulated_sample_ms:g}ms.csv"
    table.to_csv(out / name, index=False)
    print(f"wrote {out / name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="cProfile rank 0's timed rounds, one file per loop")
    parser.add_argument("--slowdown-race", action="store_true",
                        help="instead: [1,3], equal vs pid through run() per --race-syncs")
    parser.add_argument("--race-syncs", nargs="+", default=["fsdp"], choices=["fsdp", "ddp", "explicit"],
                        help="--slowdown-race: gradient path(s), each runs equal and pid")
    parser.add_argument("--race-epochs", type=int, default=6, help="--slowdown-race: epochs")
    parser.add_argument("--race-samples", type=int, default=2048, help="--slowdown-race: samples per epoch")
    parser.add_argument("--emulated-sample-ms", type=float, default=6.0,
                        help="--slowdown-race: ms per sample of the 1x rank (above resnet8's real ~3 ms, or the "
                        "emulated cost is not what the step takes)")
    parser.add_argument("--data-dir", default=os.environ.get("DYNBATCH_DATA"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"))
    args = parser.parse_args()
    started = time.perf_counter()
    slowdown_race(args) if args.slowdown_race else overhead(args)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
