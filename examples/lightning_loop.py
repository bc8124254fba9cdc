"""Exact uneven per-rank batches under Lightning's Trainer: your LightningModule and DataModule, dynbatch's strategy.

    python examples/lightning_loop.py --devices 2                 # 2 epochs, the pid balancer
    python examples/lightning_loop.py --devices 2 --check         # the checks below; exit 1 if one fails

What the user writes: an ordinary LightningModule (mean loss in training_step) and DataModule (an ordinary
DataLoader), and `strategy=DynamicBatchesStrategy(global_batch=..., balancer=...)` in the Trainer.

--check runs, in one invocation (each fit forks its ranks; 241 = 10 x 24 + 1, so each epoch's last step holds one
sample and rank 0's slice of it is empty):
  exact    a fixed split [8, 16] of 24, 2 loader workers, accumulate_grad_batches=2, gradient_clip_val=0.5, against
           one process on the same global batches; per-rank batches logged to a CSVLogger (outputs --out/exact)
  plain    stock Lightning DDP on the same uneven split: the mean of the rank means (checked against that
           reference computed in one process), not the union batch's mean
  resume   pid with an emulated 3x slower rank (emulated cost, no sleep: the same splits every run), dropout:
           uninterrupted vs killed (os._exit) after the ModelCheckpoint(every_n_train_steps=4) of step 4 and
           resumed with fit(ckpt_path=...): the same weights, bit for bit, and the same batch sizes
Validation (Lightning's own loop, its DistributedSampler, sync_dist logging) runs after every epoch of each fit.
Parseable lines: `split [a, b]`, `max |param difference| = X`, `validation: N logged, ... by X`,
`plain DDP vs mean of rank means = X`,
`resume max |param difference| = X`, `resume batch sizes equal: True`.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynbatch_core import build_balancer, epoch_order  # noqa: E402
from dynbatch_core.engine.emulation import Emulation  # noqa: E402
from dynbatch_core.integrations.lightning import DynamicBatchesStrategy  # noqa: E402

SAMPLES, LR, MOMENTUM = 241, 0.1, 0.9
VALIDATION_SAMPLES = 64
CHECK_SPLIT = [8, 16]     # --check's fixed split (rank weights 1 : 2 of a global batch of 24)
CHECKPOINT_EVERY, KILLED_AFTER = 4, 4   # optimizer steps
RUNS = ("exact", "plain", "uninterrupted", "killed", "resumed", "pid")   # the folders under --out


class Blobs(Dataset):
    """An ordinary map-style dataset: one (features, label) pair per index."""

    def __init__(self, size: int = SAMPLES, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(size, 20, generator=generator)
        self.labels = (self.features[:, :5].sum(dim=1) > 0).long()

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int):
        return self.features[index], self.labels[index]


class Classifier(pl.LightningModule):
    """A user's module: the loss is the mean over the batch, as in any Lightning example."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = make_net(dropout)

    def training_step(self, batch, batch_idx):
        features, labels = batch
        return F.cross_entropy(self.net(features), labels)

    def validation_step(self, batch, batch_idx):   # Lightning's own loop, sampler and logging, untouched
        features, labels = batch
        self.log("val_loss", F.cross_entropy(self.net(features), labels), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def make_net(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 2))


class BlobsData(pl.LightningDataModule):
    """A user's DataModule: an ordinary DataLoader (batch_size and shuffle are the strategy's business)."""

    def __init__(self, workers: int = 0):
        super().__init__()
        self.dataset, self.workers = Blobs(), workers

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=8, shuffle=True, num_workers=self.workers,
                          prefetch_factor=4 if self.workers else None, persistent_workers=self.workers > 0)

    def val_dataloader(self):
        return DataLoader(Blobs(size=VALIDATION_SAMPLES, seed=1), batch_size=16)


class FixedSplit(torch.utils.data.Sampler):
    """For stock DDP: this rank's slice of each full step of epoch `epoch`'s global order, split as `split`.
    (Lightning calls set_epoch on a batch sampler's `sampler` only: the loader is rebuilt every epoch instead.)"""

    def __init__(self, num_samples: int, split: list[int], rank: int, epoch: int):
        self.num_samples, self.split, self.rank, self.epoch = num_samples, split, rank, epoch

    def __len__(self) -> int:
        return self.num_samples // sum(self.split)

    def __iter__(self):
        order, start = epoch_order(self.num_samples, 0, self.epoch), sum(self.split[:self.rank])
        for offset in range(0, len(self) * sum(self.split), sum(self.split)):
            yield order[offset + start:offset + start + self.split[self.rank]].tolist()


class FixedSplitData(BlobsData):
    def train_dataloader(self):
        return DataLoader(self.dataset, batch_sampler=FixedSplit(SAMPLES, CHECK_SPLIT, self.trainer.global_rank,
                                                                self.trainer.current_epoch))


class KillAfter(pl.Callback):
    """Ends every rank abruptly (no teardown) when the given optimizer step is done and checkpointed."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os._exit(17)


def fit(strategy, data, out: Path, name: str, *, epochs: int, accumulate: int = 1, clip: float | None = None,
        dropout: float = 0.0, callbacks=(), ckpt_path=None) -> Classifier:
    model = Classifier(dropout)
    trainer = pl.Trainer(accelerator="cpu", devices=len(CHECK_SPLIT), strategy=strategy, max_epochs=epochs,
                         accumulate_grad_batches=accumulate, gradient_clip_val=clip, log_every_n_steps=1,
                         logger=CSVLogger(out, name=name, version=0), callbacks=list(callbacks),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         reload_dataloaders_every_n_epochs=1,
                         use_distributed_sampler=isinstance(strategy, DynamicBatchesStrategy))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


def logged_rank_batches(out: Path, name: str) -> list[tuple[int, list[int]]]:
    """(step, [samples of rank i]) of every logged optimizer step, from the CSVLogger's metrics file."""
    rows = []
    with open(out / name / "version_0" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("dynbatch/rank_batch/0"):
                rows.append((int(row["step"]), [int(float(row[f"dynbatch/rank_batch/{rank}"]))
                                                for rank in range(len(CHECK_SPLIT))]))
    return rows


def logged_validation_losses(out: Path, name: str) -> list[tuple[int, float]]:
    """(epoch, val_loss) of every validation the CSVLogger recorded."""
    with open(out / name / "version_0" / "metrics.csv", newline="") as handle:
        return [(int(row["epoch"]), float(row["val_loss"])) for row in csv.DictReader(handle) if row.get("val_loss")]


def validation_loss(net: nn.Module) -> float:
    """The mean loss over the validation set in one process (each rank's loss over its DistributedSampler share,
    averaged by sync_dist, is the same when the shares are equal: 64 samples, 2 ranks)."""
    dataset = Blobs(size=VALIDATION_SAMPLES, seed=1)
    with torch.no_grad():
        return F.cross_entropy(net(dataset.features), dataset.labels).item()


def one_process(global_batch: int, epochs: int, accumulate: int, clip: float | None, *,
                mean_of_rank_means: bool = False) -> nn.Module:
    """One process on the same global batches: the union batch's mean per optimizer step, or (stock DDP's
    update on CHECK_SPLIT, full steps only) the mean over micro-batches and ranks of each rank's mean."""
    dataset, net = Blobs(), Classifier().net
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    last = SAMPLES // global_batch * global_batch if mean_of_rank_means else SAMPLES
    for epoch in range(epochs):
        order = epoch_order(SAMPLES, 0, epoch)
        steps = [order[offset:min(offset + global_batch, last)] for offset in range(0, last, global_batch)]
        for first in range(0, len(steps), accumulate):
            group = steps[first:first + accumulate]
            if mean_of_rank_means:
                slices = [step[start:start + size] for step in group
                          for start, size in zip((0, CHECK_SPLIT[0]), CHECK_SPLIT)]
                loss = sum(F.cross_entropy(net(dataset.features[s]), dataset.labels[s]) for s in slices)
                loss = loss / (accumulate * len(CHECK_SPLIT))
            else:
                indices = torch.cat(group)
                loss = F.cross_entropy(net(dataset.features[indices]), dataset.labels[indices])
            optimizer.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            optimizer.step()
    return net


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def check(args, out: Path) -> int:
    failures = 0
    epochs, batch, accumulate, clip = args.epochs, sum(CHECK_SPLIT), 2, 0.5
    weights = build_balancer("weights", len(CHECK_SPLIT), rank_weights=[1.0, 2.0])
    exact = fit(DynamicBatchesStrategy(global_batch=batch, balancer=weights, start_method="fork"),
                BlobsData(args.workers), out, "exact", epochs=epochs, accumulate=accumulate, clip=clip)
    difference = max_difference(exact.net, one_process(batch, epochs, accumulate, clip))
    print(f"split {weights.split(batch)}")
    print(f"max |param difference| = {difference:.3g} (2 ranks, uneven split, {args.workers} workers, "
          f"accumulate {accumulate}, clip {clip}, vs one process)")
    failures += difference > 1e-5
    logged = logged_validation_losses(out, "exact")
    val_difference = abs(logged[-1][1] - validation_loss(exact.net)) if logged else float("inf")
    print(f"validation: {len(logged)} logged, last val_loss differs from one process by {val_difference:.3g}")
    failures += len(logged) != epochs or val_difference > 1e-5

    plain = fit(DDPStrategy(start_method="fork"), FixedSplitData(), out, "plain", epochs=epochs,
                accumulate=accumulate, clip=clip)
    to_reference = max_difference(plain.net, one_process(batch, epochs, accumulate, clip, mean_of_rank_means=True))
    print(f"plain DDP vs mean of rank means = {to_reference:.3g}; plain DDP vs dynbatch = "
          f"{max_difference(plain.net, exact.net):.3g}")
    failures += to_reference > 1e-5

    def resume_fit(name: str, *callbacks, ckpt_path=None):
        strategy = DynamicBatchesStrategy(global_batch=batch, balancer="pid", slowdown=[1.0, 3.0],
                                          emulation=Emulation(sample_s=0.001, step_s=0.002, sleep=False),
                                          start_method="fork")
        keep = ModelCheckpoint(dirpath=out / name / "checkpoints", filename="{step}",
                               every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1)
        return fit(strategy, BlobsData(args.workers), out, name, epochs=epochs, accumulate=accumulate, clip=clip,
                   dropout=0.1, callbacks=[keep, *callbacks], ckpt_path=ckpt_path)

    uninterrupted = resume_fit("uninterrupted")
    try:
        resume_fit("killed", KillAfter(KILLED_AFTER))
        print("resume: the killed run was not killed")
        failures += 1
    except Exception as error:   # the launcher reports the ranks' exit code 17
        print(f"killed after step {KILLED_AFTER}: {type(error).__name__}")
    resumed = resume_fit("resumed", ckpt_path=out / "killed" / "checkpoints" / f"step={KILLED_AFTER}.ckpt")
    difference = max_difference(uninterrupted.net, resumed.net)
    after = [row for row in logged_rank_batches(out, "uninterrupted") if row[0] >= KILLED_AFTER]
    same_batches = after == logged_rank_batches(out, "resumed") and len(after) > 0
    splits = sorted({tuple(sizes) for _, sizes in after})
    print(f"resume max |param difference| = {difference:.3g}; splits after step {KILLED_AFTER}: {splits}")
    print(f"resume batch sizes equal: {same_batches}")
    failures += difference != 0 or not same_batches
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="ranks (CPU processes); --check needs 2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=48, help="global batch (samples per step, all ranks)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    parser.add_argument("--check", action="store_true", help="the checks of the docstring")
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_loop"),
                        help="logs and checkpoints (its run folders are replaced)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))   # the forked ranks inherit it
    for run in RUNS:   # this script's own folders only: --out may hold other things
        shutil.rmtree(args.out / run, ignore_errors=True)
    if args.check:
        if args.devices != len(CHECK_SPLIT):
            parser.error(f"--check runs on {len(CHECK_SPLIT)} devices")
        return check(args, args.out)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, max_epochs=args.epochs, log_every_n_steps=1,
                         strategy=DynamicBatchesStrategy(global_batch=args.batch_size, balancer="pid"),
                         logger=CSVLogger(args.out, name="pid", version=0), enable_progress_bar=False)
    trainer.fit(Classifier(), BlobsData(args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
