"""Exact uneven per-rank batches in your own training loop: stock DDP, an ordinary dataset, DataLoader workers.

    torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py             # 2 epochs, the pid balancer
    torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --check     # a fixed uneven split vs one process

Copy it and replace `Blobs` and `make_model` with your own. What dynbatch adds to a plain DDP loop:
  1. wrap_ddp(model, device): stock DistributedDataParallel with a comm hook that *sums* gradients (each rank's loss
     is already divided by the global batch) and clocks each rank's compute at the moment its last gradient bucket
     is ready, so the balancer never sees time spent waiting for slower ranks;
  2. DynamicBatchSampler + planned_loader: one global sample order per epoch cut into per-rank slices of any size;
     every batch arrives with its step's plan (`plan.global_batch`, `plan.rank_batches`), so DataLoader workers
     may prefetch freely;
  3. a balancer whose split rank 0 decides and broadcasts (decided_by_rank0), planned `lookahead` steps ahead:
     as far as the loader prefetches;
  4. uneven_batch_loss(logits, labels, plan.global_batch): summed loss / global batch.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, default_collate

from dynbatch_core import (DynamicBatchSampler, build_balancer, decided_by_rank0, epoch_order, exchange_measurements,
                           exit_without_teardown, planned_loader, prefetch_depth, uneven_batch_loss, wrap_ddp)


class Blobs(Dataset):
    """An ordinary map-style dataset: one (features, label) pair per index."""

    def __init__(self, size: int = 1000, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(size, 20, generator=generator)
        self.labels = (self.features[:, :5].sum(dim=1) > 0).long()

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int):
        return self.features[index], self.labels[index]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=48, help="global batch (samples per step, all ranks)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    parser.add_argument("--check", action="store_true", help="a fixed uneven split; compare with one process")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    dataset = Blobs()
    model = wrap_ddp(make_model().to(device), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = DynamicBatchSampler(len(dataset), rank=rank, world_size=world, seed=0, require_plans=True)
    loader = planned_loader(dataset, sampler, collate_fn=default_collate, num_workers=args.workers)
    lookahead = prefetch_depth(loader)   # as far ahead as the loader prefetches (its workers x prefetch_factor)
    if args.check:  # rank i holds i + 1 shares: 16/32 of 48 on 2 ranks
        balancer = build_balancer("weights", world, rank_weights=[float(i + 1) for i in range(world)])
    else:
        balancer = build_balancer("pid", world)

    def next_split() -> list[int]:
        return decided_by_rank0(lambda: balancer.split(args.batch_size), world, device=device, integers=True)

    trained = []  # (epoch, offset, global batch) of every step, for --check
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for step in range(lookahead + 1):
            sampler.plan_step(step, next_split())
        for (features, labels), plan in loader:
            model.clock.start()
            loss = uneven_batch_loss(model(features.to(device)), labels.to(device), plan.global_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            compute_s, rank_batches, loss_sums = exchange_measurements(
                model.clock.compute_s, len(labels), device=device, loss_sum=loss.item() * plan.global_batch)
            balancer.observe(compute_s, rank_batches)
            sampler.plan_step(plan.step + lookahead + 1, next_split())
            trained.append((epoch, plan.offset, plan.global_batch))
        balancer.end_epoch()
        if rank == 0:
            print(f"epoch {epoch + 1}: last split {rank_batches}, loss {sum(loss_sums) / plan.global_batch:.4f}")

    status = 0
    if args.check and rank == 0:
        difference = max_difference_from_one_process(model.module, dataset, trained)
        print(f"max |param difference| = {difference:.3g} (2 ranks with uneven batches vs one process)")
        status = 0 if difference <= 1e-5 else 1
    dist.destroy_process_group()
    return status


def max_difference_from_one_process(trained_model: nn.Module, dataset: Blobs, steps) -> float:
    """Train a fresh copy in this process alone on the same global batches; the largest parameter difference."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch, offset, global_batch in steps:
        indices = epoch_order(len(dataset), 0, epoch)[offset:offset + global_batch].tolist()
        features, labels = default_collate([dataset[i] for i in indices])
        loss = nn.functional.cross_entropy(model(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return max((a.detach().cpu() - b.detach()).abs().max().item()
               for a, b in zip(trained_model.parameters(), model.parameters()))


if __name__ == "__main__":
    # os._exit instead of sys.exit: torch 2.14.1's gloo can abort a process while Python tears it down after
    # destroy_process_group, which torchrun would report as a failed worker (dynbatch_core.engine.distributed explains)
    exit_without_teardown(main())
