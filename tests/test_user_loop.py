"""DynamicBatches, the object for a user's loop, in real gloo groups of 2 and 3 ranks: exact against one process on
stock DDP and on FSDP2, with 2 loader workers (prefetch_factor=4), a split that changes every step (an empty slice
included) and B changing mid-epoch; micro-batches and clipping on FSDP2; mid-epoch resume, also onto 3 ranks."""
import datetime
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dynbatch_core import DynamicBatches, epoch_order
from dynbatch_core.batching.balancer_base import Balancer, largest_remainder_split
from dynbatch_core.batching.schedules import Schedule
from dynbatch_core.engine.distributed import exit_without_teardown
from dynbatch_core.engine.fsdp import full_model_state, full_optimizer_state, load_full_state

pytestmark = pytest.mark.slow

SAMPLES, BATCH, EPOCHS, LR = 600, 48, 2, 0.1
# rank weights, one per step in turn: a zero weight is an empty slice
SCRIPTED_WEIGHTS = {2: [[10, 38], [0, 1], [30, 18], [1, 1], [5, 1]],
                    3: [[1, 4, 2], [0, 1, 3], [2, 0, 1], [1, 1, 1], [3, 2, 0]]}
STOP_AT = 2   # the resumed runs stop after step 2 (mid-epoch 0) and continue from their saved state


class Records(torch.utils.data.Dataset):
    """Dict samples, collated by the user's own collate_fn below."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(SAMPLES, 16, generator=generator)
        self.y = (self.x[:, :4].sum(dim=1) > 0).long() + (self.x[:, 4] > 1).long()

    def __len__(self):
        return SAMPLES

    def __getitem__(self, index):
        return {"x": self.x[index], "y": self.y[index]}


def collate_records(samples):
    return {"x": torch.stack([s["x"] for s in samples]), "y": torch.stack([s["y"] for s in samples])}


class ScriptedBalancer(Balancer):
    """Another split every step (its count is state, so a resumed run continues the script)."""
    name = "scripted"

    def __init__(self, world_size: int):
        super().__init__(world_size, min_rank_batch=0)
        self.calls = 0

    def split(self, global_batch: int) -> list[int]:
        weights = SCRIPTED_WEIGHTS[self.world_size][self.calls % len(SCRIPTED_WEIGHTS[self.world_size])]
        self.calls += 1
        return largest_remainder_split(global_batch, weights, min_size=0)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.calls = state["calls"]


class HalvingRule:
    """A step rule: B moves between 48 and 20, first after 2 steps, then every 3 (plus the lookahead: with 2
    workers x prefetch_factor 4 a new B is trained 9 steps after its decision, inside the 13-step epoch)."""
    decide_every = 2

    def observe(self, rank_batches, compute_s, overhead_s=0.0):
        pass

    def decide(self, current: int) -> tuple[int, int]:
        return (20 if current == BATCH else BATCH), 3


class MovingSchedule(Schedule):
    name = "moving"

    def __init__(self):
        super().__init__(initial_batch=BATCH)
        self.rule = HalvingRule()


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(16, 32), nn.Tanh()), nn.Sequential(nn.Linear(32, 32), nn.Tanh()),
                         nn.Linear(32, 3))


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    for block in model:
        fully_shard(block)
    return fully_shard(model)


def full_weights(model: nn.Module) -> dict:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
    return full_model_state(model)


def train(world_size: int, *, fsdp: bool, workers: int = 0, micro: int | None = None, clip: float | None = None,
          stop_at: int | None = None, state: dict | None = None):
    """One run of the user's loop; returns (full weights, [(epoch, offset, B)] trained, the state at stop_at)."""
    model = make_model()
    # fork: the ranks are spawned, and spawned loader workers would import torch again (~10 s here)
    loader_options = dict(num_workers=workers, prefetch_factor=4, persistent_workers=True,
                          multiprocessing_context="fork") if workers else {}
    batches = DynamicBatches(Records(), global_batch=MovingSchedule(), balancer=ScriptedBalancer(world_size),
                             collate_fn=collate_records, **loader_options)
    model = batches.prepare(shard(model) if fsdp else model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if state is not None:
        load_user_state(model, optimizer, batches, state)
    trained, saved = [], None
    for epoch in range(batches.resume_epoch, EPOCHS):
        for batch, step in batches.epoch(epoch):
            if micro is None:
                loss = step.scale(F.cross_entropy(model(batch["x"]), batch["y"]))
                optimizer.zero_grad()
                loss.backward()
            else:
                optimizer.zero_grad()
                for part in step.micro_batches(batch, micro):
                    part.scale(F.cross_entropy(model(part.data["x"]), part.data["y"])).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            trained.append((epoch, step.offset, step.global_batch))
            if stop_at is not None and batches.global_step == stop_at:
                return full_weights(model), trained, user_state(model, optimizer, batches)
    return full_weights(model), trained, saved


def user_state(model, optimizer, batches) -> dict:
    """The full (unsharded) states, on rank 0 ({} on the others), and the object's, on every rank."""
    return {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer),
            "batches": batches.state_dict()}


def load_user_state(model, optimizer, batches, state) -> None:
    """Every rank loads the full states (as every rank would read one checkpoint file)."""
    load_full_state(model, optimizer, state["model"], state["optimizer"])
    batches.load_state_dict(state["batches"])


def run_jobs(rank: int, world_size: int, store_file: str, folder: str) -> None:
    """Spawned: every run of this world size in one gloo group; rank 0 writes what the parent asserts."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_file, world_size), rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    found = {}
    try:
        for name, options in {"ddp": dict(fsdp=False, workers=2), "fsdp": dict(fsdp=True, workers=2)}.items():
            weights, trained, _ = train(world_size, **options)
            found[name] = {"weights": weights, "trained": trained}
        if world_size == 2:   # micro-batches and clipping; a stop mid-epoch, continued in fresh objects
            weights, trained, _ = train(2, fsdp=True, micro=4, clip=0.3)
            found["fsdp micro 4 clip"] = {"weights": weights, "trained": trained}
            _, first, state = train(2, fsdp=True, workers=2, stop_at=STOP_AT)
            if rank == 0:   # before loading: set_model_state_dict turns the loaded dict's tensors into shards
                torch.save({"state": state, "trained": first}, Path(folder) / "two_rank_state.pt")
            shared = [state]
            dist.broadcast_object_list(shared, src=0)   # rank 0's full states, as if read from its file
            weights, rest, _ = train(2, fsdp=True, workers=2, state=shared[0])
            found["fsdp resumed"] = {"weights": weights, "trained": first + rest}
        else:                 # the 2-rank run's state, continued on 3 ranks
            saved = torch.load(Path(folder) / "two_rank_state.pt", weights_only=False)
            weights, rest, _ = train(3, fsdp=True, workers=2, state=saved["state"])
            found["fsdp 2 onto 3"] = {"weights": weights, "trained": saved["trained"] + rest}
    except Exception:  # noqa: BLE001 - reported to the parent
        found["error"] = traceback.format_exc()
    if rank == 0:
        torch.save(found, Path(folder) / f"found_{world_size}.pt")
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown(0)


def one_process(trained, *, clip: float | None = None) -> dict:
    """The same global batches in one process, mean loss over each union batch."""
    model, dataset = make_model(), Records()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for epoch, offset, global_batch in trained:
        batch = collate_records([dataset[i] for i in epoch_order(SAMPLES, 0, epoch)[offset:offset + global_batch]])
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world size: {run: {"weights", "trained"}}}: one spawn per world size (each costs seconds)."""
    folder = tmp_path_factory.mktemp("user_loop")
    found = {}
    for world_size in (2, 3):
        mp.start_processes(run_jobs, args=(world_size, str(folder / f"store{world_size}"), str(folder)),
                           nprocs=world_size, start_method="spawn")
        found[world_size] = torch.load(folder / f"found_{world_size}.pt", weights_only=False)
        assert "error" not in found[world_size], found[world_size]["error"]
    return found


def max_difference(a: dict, b: dict) -> float:
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_the_user_loop_on_a_changing_uneven_split_matches_one_process(runs, world_size, run):
    found = runs[world_size][run]
    batches = [global_batch for _, _, global_batch in found["trained"]]
    assert {20, BATCH} <= set(batches)                     # B moved inside epochs
    assert sum(batches) == EPOCHS * SAMPLES                # every sample once per epoch
    assert max_difference(found["weights"], one_process(found["trained"])) <= 1e-5


def test_micro_batches_and_clipping_on_fsdp2_match_one_process(runs):
    found = runs[2]["fsdp micro 4 clip"]
    clipped = one_process(found["trained"], clip=0.3)
    assert max_difference(found["weights"], clipped) <= 1e-5
    assert max_difference(one_process(found["trained"]), clipped) > 1e-4   # the clip did clip


def test_fsdp2_resumed_mid_epoch_is_bit_exact_and_continues_on_three_ranks(runs):
    uninterrupted, resumed = runs[2]["fsdp"], runs[2]["fsdp resumed"]
    assert resumed["trained"] == uninterrupted["trained"]
    assert all(torch.equal(resumed["weights"][key], uninterrupted["weights"][key]) for key in resumed["weights"])
    onto_three = runs[3]["fsdp 2 onto 3"]
    assert onto_three["trained"] == uninterrupted["trained"]   # the same global batches, cut over 3 ranks
    assert max_difference(onto_three["weights"], uninterrupted["weights"]) <= 1e-5


def test_the_lookahead_follows_the_loaders_own_prefetch_factor():
    batches = DynamicBatches(Records(), global_batch=BATCH, balancer="equal", collate_fn=collate_records,
                             num_workers=2, prefetch_factor=4)
    assert batches.lookahead == 8
    assert DynamicBatches(Records(), global_batch=BATCH, balancer="equal").lookahead == 0


def test_an_empty_slice_gives_a_zero_loss_that_still_reaches_every_parameter():
    batches = DynamicBatches(Records(), global_batch=BATCH, balancer="equal")
    model = nn.Linear(16, 3)
    batches.sampler.set_epoch(0)
    from dynbatch_core.engine.dynamic_batches import Step
    from dynbatch_core.engine.sampler import StepPlan
    step = Step(batches, StepPlan([], epoch=0, step=0, offset=0, rank_batches=[0, 5]))
    loss = step.scale(F.cross_entropy(model(torch.zeros(0, 16)), torch.zeros(0, dtype=torch.long)))
    loss.backward()
    assert loss.item() == 0.0 and step.loss_sum() == 0.0
    assert torch.equal(model.weight.grad, torch.zeros_like(model.weight))


def test_bad_input_is_one_clear_line():
    with pytest.raises(ValueError, match="global_batch must be an int >= 1"):
        DynamicBatches(Records(), global_batch=0)
    with pytest.raises(ValueError, match="decides the batches itself: leave out batch_size, drop_last"):
        DynamicBatches(Records(), global_batch=8, batch_size=4, drop_last=True)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        DynamicBatches(Records(), global_batch=8).prepare(nn.Linear(16, 3))
