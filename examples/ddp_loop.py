"""Exact uneven per-rank batches in your own training loop: stock DDP, an ordinary dataset, DataLoader workers.

    torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py             # 2 epochs, the pid balancer
    torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --check     # a fixed uneven split vs one process

Copy it and replace `Blobs` and `make_model` with your own. What dynbatch adds to a plain DDP loop is one object,
DynamicBatches, built from the dataset, the global batch, the balancer and the DataLoader options you would have
passed anyway, and three touch points:
  1. batches.prepare(model): stock DistributedDataParallel with a comm hook that *sums* gradients and clocks each
     rank's compute when its last gradient bucket is ready (the balancer never sees time spent waiting);
  2. batches.epoch(epoch): the epoch's batches, each with its step (this rank's slice of one global order, of the
     size the balancer chose); between steps every rank's compute time is exchanged and rank 0 plans the splits
     as far ahead as the loader prefetches;
  3. step.scale(loss): a mean loss times this rank's share b_i / B, so the summed gradient is the union batch's.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from dynbatch_core import DynamicBatches, build_balancer, epoch_order, exit_without_teardown


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
    # --check: rank i holds i + 1 shares (16/32 of 48 on 2 ranks); otherwise pid balances on measured compute
    balancer = build_balancer("weights", world, rank_weights=[i + 1.0 for i in range(world)]) if args.check else "pid"
    batches = DynamicBatches(dataset, global_batch=args.batch_size, balancer=balancer, device=device,
                             collate_fn=default_collate, num_workers=args.workers,
                             prefetch_factor=4 if args.workers else None, persistent_workers=args.workers > 0)
    model = batches.prepare(make_model().to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    trained = []  # (epoch, offset, global batch) of every step, for --check
    for epoch in range(args.epochs):
        for (features, labels), step in batches.epoch(epoch):
            loss = step.scale(F.cross_entropy(model(features.to(device)), labels.to(device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            trained.append((epoch, step.offset, step.global_batch))
        if rank == 0:
            print(f"epoch {epoch + 1}: last split {step.rank_batches}, loss {batches.history[-1].train_loss:.4f}")

    status = 0
    if args.check and rank == 0:
        difference = max_difference_from_one_process(model.module, dataset, trained)
        print(f"max |param difference| = {difference:.3g} ({world} ranks with uneven batches vs one process)")
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
        loss = F.cross_entropy(model(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return max((a.detach().cpu() - b.detach()).abs().max().item()
               for a, b in zip(trained_model.parameters(), model.parameters()))


if __name__ == "__main__":
    # os._exit instead of sys.exit: torch 2.14.1's gloo can abort a process while Python tears it down after
    # destroy_process_group, which torchrun would report as a failed worker (dynbatch_core.engine.distributed explains)
    exit_without_teardown(main())
