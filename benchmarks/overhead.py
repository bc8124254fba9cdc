"""Homogeneous throughput of dynbatch's two gradient paths against a plain DDP loop, side by side in one run.

    python benchmarks/overhead.py                                        # resnet20, global batch 64, 2 ranks
    python benchmarks/overhead.py --model resnet18 --bucket-cap-mb 5     # several gradient buckets: overlap matters

Three loops run in the same processes, on the same data, model and global batch, in rounds whose order rotates
(so that drift in machine load hits all alike):
  plain DDP       DistributedSampler + DataLoader + DistributedDataParallel (mean hook, overlapped all-reduce)
  dynbatch DDP    DynamicBatchSampler + planned_loader + wrap_ddp + ddp_step.ddp_train_step (summing, clocking hook)
  dynbatch expl.  DynamicBatchSampler + planned_loader + GradientSync + step.train_step (all-reduce after backward)
Prints samples/s per round, each dynbatch loop's ratio to plain DDP (median and range over rounds) and the number
of gradient buckets; writes outputs/benchmarks/overhead[-MODEL].csv and .png.
"""
from __future__ import annotations

import argparse
import os
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
from dynbatch_core.data import collate_batch, load_datasets  # noqa: E402
from dynbatch_core.engine.ddp_step import ddp_train_step, wrap_ddp  # noqa: E402
from dynbatch_core.engine.distributed import (LoopbackStore, exit_without_teardown, init_process_group,  # noqa: E402
                                      threads_per_rank)
from dynbatch_core.engine.loader import planned_loader  # noqa: E402
from dynbatch_core.models import build_model  # noqa: E402
from dynbatch_core.engine.sampler import DynamicBatchSampler  # noqa: E402
from dynbatch_core.engine.step import GradientSync, train_step  # noqa: E402

LOOPS = ("plain DDP", "dynbatch DDP", "dynbatch explicit")


def timed(batches, step, steps: int) -> float:
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    dist.barrier()
    return time.perf_counter() - started


def dynbatch_batches(dataset, rank, world_size, global_batch, epoch):
    sampler = DynamicBatchSampler(len(dataset), rank=rank, world_size=world_size, seed=epoch)
    sampler.set_epoch(epoch)
    sampler.set_rank_batches([global_batch // world_size] * world_size)
    return iter(planned_loader(dataset, sampler, collate_fn=collate_batch))


def plain_batches(dataset, world_size, global_batch, epoch):
    sampler = DistributedSampler(dataset, shuffle=True, seed=epoch)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=global_batch // world_size, sampler=sampler, collate_fn=collate_batch)
    return ((batch, None) for batch in loader)


def worker(rank, args, address, results):
    torch.set_num_threads(threads_per_rank(args.world_size))
    init_process_group("cpu", rank, args.world_size, address, timeout_s=300)
    train, _, _ = load_datasets("mnist", data_dir=args.data_dir, train_samples=args.steps * args.batch_size * 2,
                                test_samples=100)
    device = torch.device("cpu")
    models, optimizers = {}, {}
    for loop in LOOPS:
        torch.manual_seed(0)
        model = build_model(args.model, in_channels=1, num_classes=10)
        if loop == "plain DDP":
            model = DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
        elif loop == "dynbatch DDP":
            model = wrap_ddp(model, device, bucket_cap_mb=args.bucket_cap_mb)
        models[loop] = model
        optimizers[loop] = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sync = GradientSync(models["dynbatch explicit"].parameters(), world_size=args.world_size,
                        bucket_mb=args.bucket_cap_mb)

    def step_of(loop):
        model, optimizer = models[loop], optimizers[loop]
        if loop == "plain DDP":
            def step(batch, plan):
                images, labels = batch
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(images), labels).backward()
                optimizer.step()
        elif loop == "dynbatch DDP":
            def step(batch, plan):
                ddp_train_step(model, optimizer, *batch, global_batch=plan.global_batch, rank=rank)
        else:
            def step(batch, plan):
                train_step(model, optimizer, *batch, global_batch=plan.global_batch, rank=rank, sync=sync)
        return step

    def batches_of(loop, epoch):
        if loop == "plain DDP":
            return plain_batches(train, args.world_size, args.batch_size, epoch)
        return dynbatch_batches(train, rank, args.world_size, args.batch_size, epoch)

    for loop in LOOPS:  # one untimed warm-up round each (allocator, thread pools, DDP bucket rebuild)
        timed(batches_of(loop, 100), step_of(loop), 5)
    rows = []
    for round_index in range(args.rounds):
        order = LOOPS[round_index % 3:] + LOOPS[:round_index % 3]
        for loop in order:
            seconds = timed(batches_of(loop, round_index), step_of(loop), args.steps)
            rows.append({"round": round_index, "loop": loop, "samples_per_s": args.steps * args.batch_size / seconds})
    if rank == 0:
        results.put({"rows": rows, "buckets": models["dynbatch DDP"].clock.buckets})
    dist.destroy_process_group()
    exit_without_teardown(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="gradient bucket size (DDP's default 25)")
    parser.add_argument("--data-dir", default=os.environ.get("DYNBATCH_DATA"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"))
    args = parser.parse_args()

    results = mp.get_context("spawn").SimpleQueue()
    store = LoopbackStore()  # kept alive while the ranks run
    mp.spawn(worker, args=(args, store.address, results), nprocs=args.world_size, join=True)
    found = results.get()
    table = pd.DataFrame(found["rows"])
    wide = table.pivot(index="round", columns="loop", values="samples_per_s")
    setting = (f"{args.world_size} ranks, {args.model}, global batch {args.batch_size}, {args.rounds} rounds, "
               f"{found['buckets']} gradient bucket(s) of <= {args.bucket_cap_mb:g} MB")
    print(wide.to_string(float_format=lambda v: f"{v:.1f}"))
    ratios = {}
    for loop in LOOPS[1:]:
        ratio = wide[loop] / wide["plain DDP"]
        ratios[loop] = ratio
        print(f"{loop} / plain DDP: median {ratio.median():.3f} (range {ratio.min():.3f}-{ratio.max():.3f})")
    print(setting)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "overhead" if args.model == "resnet20" else f"overhead-{args.model}"
    table.assign(world_size=args.world_size, model=args.model, global_batch=args.batch_size,
                 buckets=found["buckets"]).to_csv(out / f"{name}.csv", index=False)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(7, 4))
        sns.barplot(table, x="round", y="samples_per_s", hue="loop", hue_order=list(LOOPS), ax=ax)
        ax.set(xlabel="round (order rotates, same processes)", ylabel="throughput (samples/s)",
               title=f"Homogeneous throughput, {setting}\n" + ", ".join(
                   f"{loop} / plain: {ratio.median():.3f}" for loop, ratio in ratios.items()))
        ax.title.set_fontsize("small")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
