"""Exact uneven per-rank batches under FSDP2 (`fully_shard` per block) in your own training loop.

    torchrun --standalone --nproc-per-node 2 examples/fsdp_loop.py             # 2 epochs, the pid balancer
    torchrun --standalone --nproc-per-node 2 examples/fsdp_loop.py --check     # a fixed uneven split vs one process

The loop is the same as examples/ddp_loop.py: DynamicBatches recognises a model already passed through
`fully_shard` and gives every FSDPModule the summing contract (gradient divide factor 1 and forced SUM reductions:
each rank's loss is already its share of the union batch's mean), times each rank's compute without the time it
waits inside FSDP's all-gathers and reduce-scatters, and refuses a reduction in anything but float32
(`MixedPrecisionPolicy(param_dtype=torch.bfloat16)` alone reduces in bf16: add `reduce_dtype=torch.float32`).
Every rank runs the same number of forward/backward calls (an empty slice too), as FSDP2 needs.

Checkpoints: the full (unsharded) state of model and optimizer from torch.distributed.checkpoint.state_dict plus
`batches.state_dict()` resume exactly, also on another number of ranks.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import TensorDataset

from dynbatch_core import DynamicBatches, build_balancer, epoch_order, exit_without_teardown


class Block(nn.Module):
    """A residual MLP block (what a transformer layer's feed-forward half is)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, features: int = 20, width: int = 32, depth: int = 3, classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_dataset(size: int = 1000) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(size, 20, generator=generator)
    return TensorDataset(features, features[:, :4].argmax(dim=1))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return Stack()


def shard(model: Stack) -> Stack:
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


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

    dataset = make_dataset()
    # --check: rank i holds i + 1 shares (16/32 of 48 on 2 ranks); otherwise pid balances on measured compute
    balancer = build_balancer("weights", world, rank_weights=[i + 1.0 for i in range(world)]) if args.check else "pid"
    batches = DynamicBatches(dataset, global_batch=args.batch_size, balancer=balancer, device=device,
                             num_workers=args.workers, persistent_workers=args.workers > 0)
    model = batches.prepare(shard(make_model().to(device)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    trained = []  # (epoch, offset, global batch) of every step, for --check
    for epoch in range(args.epochs):
        for (features, labels), step in batches.epoch(epoch):
            loss = step.scale(F.cross_entropy(model(features.to(device)), labels.to(device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # the global gradient's norm
            optimizer.step()
            trained.append((epoch, step.offset, step.global_batch))
        if rank == 0:
            print(f"epoch {epoch + 1}: last split {step.rank_batches}, loss {batches.history[-1].train_loss:.4f}")

    weights = full_weights(model)   # collective: every rank takes part
    status = 0
    if args.check and rank == 0:
        difference = max_difference_from_one_process(weights, dataset, trained)
        print(f"max |param difference| = {difference:.3g} ({world} ranks with uneven batches on FSDP2 vs one process)")
        status = 0 if difference <= 1e-5 else 1
    dist.destroy_process_group()
    return status


def full_weights(model: nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def max_difference_from_one_process(weights: dict, dataset: TensorDataset, steps) -> float:
    """Train a fresh copy in this process alone on the same global batches; the largest parameter difference."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch, offset, global_batch in steps:
        features, labels = dataset[epoch_order(len(dataset), 0, epoch)[offset:offset + global_batch]]
        loss = F.cross_entropy(model(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return max((weights[name] - value.detach()).abs().max().item() for name, value in model.state_dict().items())


if __name__ == "__main__":
    exit_without_teardown(main())   # os._exit: see examples/ddp_loop.py
