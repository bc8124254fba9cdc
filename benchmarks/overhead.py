"""Homogeneous throughput of the dynbatch engine against a plain DDP loop, side by side in one run.

    python benchmarks/overhead.py                     # world size 2, resnet20 on MNIST, global batch 64
    python benchmarks/overhead.py --steps 60 --rounds 4 --data-dir ../shared/data

Both loops run in the same two processes, on the same data, model and global batch, in alternating rounds
(engine, DDP, engine, DDP, ...) so that drift in machine load hits both alike:
  engine: DynamicBatchSampler + GradientSync + step.train_step (explicit bucketed all-reduce after backward)
  plain:  DistributedSampler + DataLoader + DistributedDataParallel (all-reduce overlapped with backward)
Prints samples/s per round and the ratio engine / plain (median over rounds), and writes
outputs/benchmarks/overhead.csv and overhead.png.
"""
from __future__ import annotations

import argparse
import os
import statistics
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
from dynbatch_core.distributed import LoopbackStore, init_process_group, threads_per_rank  # noqa: E402
from dynbatch_core.models import build_model  # noqa: E402
from dynbatch_core.sampler import DynamicBatchSampler  # noqa: E402
from dynbatch_core.step import GradientSync, train_step  # noqa: E402


def engine_round(model, optimizer, dataset, rank, world_size, global_batch, steps, epoch):
    sampler = DynamicBatchSampler(len(dataset), rank=rank, world_size=world_size, seed=epoch)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch)
    sync = GradientSync(model.parameters(), world_size=world_size)
    sampler.set_epoch(epoch)
    sampler.set_rank_batches([global_batch // world_size] * world_size)
    batches = iter(loader)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        train_step(model, optimizer, images, labels, global_batch=global_batch, rank=rank, sync=sync)
    dist.barrier()
    return time.perf_counter() - started


def plain_ddp_round(ddp_model, optimizer, dataset, world_size, global_batch, steps, epoch):
    sampler = DistributedSampler(dataset, shuffle=True, seed=epoch)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=global_batch // world_size, sampler=sampler, collate_fn=collate_batch)
    batches = iter(loader)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ddp_model(images), labels).backward()
        optimizer.step()
    dist.barrier()
    return time.perf_counter() - started


def worker(rank, args, address, results):
    torch.set_num_threads(threads_per_rank(args.world_size))
    init_process_group("cpu", rank, args.world_size, address, timeout_s=300)
    train, _, _ = load_datasets("mnist", data_dir=args.data_dir, train_samples=args.steps * args.batch_size * 2,
                                test_samples=100)
    torch.manual_seed(0)
    engine_model = build_model(args.model, in_channels=1, num_classes=10)
    plain_model = DistributedDataParallel(build_model(args.model, in_channels=1, num_classes=10))
    engine_opt = torch.optim.SGD(engine_model.parameters(), lr=0.05, momentum=0.9)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.05, momentum=0.9)
    # one untimed warm-up round of each (allocator, thread pools, DDP bucket rebuild)
    engine_round(engine_model, engine_opt, train, rank, args.world_size, args.batch_size, 5, 100)
    plain_ddp_round(plain_model, plain_opt, train, args.world_size, args.batch_size, 5, 100)
    rows = []
    for round_index in range(args.rounds):
        engine_s = engine_round(engine_model, engine_opt, train, rank, args.world_size, args.batch_size,
                                args.steps, round_index)
        plain_s = plain_ddp_round(plain_model, plain_opt, train, args.world_size, args.batch_size, args.steps,
                                  round_index)
        rows.append({"round": round_index, "engine_samples_per_s": args.steps * args.batch_size / engine_s,
                     "plain_ddp_samples_per_s": args.steps * args.batch_size / plain_s})
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", default=os.environ.get("DYNBATCH_DATA"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"))
    args = parser.parse_args()

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    store = LoopbackStore()  # kept alive while the ranks run
    mp.spawn(worker, args=(args, store.address, results), nprocs=args.world_size, join=True)
    table = pd.DataFrame(results.get())
    table["ratio"] = table.engine_samples_per_s / table.plain_ddp_samples_per_s
    median_ratio = statistics.median(table.ratio)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"median engine / plain DDP throughput: {median_ratio:.3f} "
          f"({args.world_size} ranks, {args.model}, global batch {args.batch_size}, {args.rounds} rounds)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.assign(world_size=args.world_size, model=args.model, global_batch=args.batch_size).to_csv(
        out / "overhead.csv", index=False)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid")
    long = table.melt(id_vars="round", value_vars=["engine_samples_per_s", "plain_ddp_samples_per_s"],
                      var_name="loop", value_name="samples_per_s")
    long["loop"] = long.loop.map({"engine_samples_per_s": "dynbatch engine", "plain_ddp_samples_per_s": "plain DDP"})
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.barplot(long, x="round", y="samples_per_s", hue="loop", ax=ax)
    ax.set(xlabel="round (alternating, same processes)", ylabel="throughput (samples/s)",
           title=f"Homogeneous throughput, {args.world_size} ranks: ratio {median_ratio:.3f}")
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=120)


if __name__ == "__main__":
    main()
