"""Multi-rank behaviour of single functions, in real gloo process groups: an empty slice, the guards."""
import datetime
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynbatch_core.engine.agreement import check_ranks_agree
from dynbatch_core.engine.checkpoint import save_checkpoint
from dynbatch_core.engine.distributed import agree_on_round, exit_without_teardown
from dynbatch_core.engine.elastic import newest_checkpoint
from dynbatch_core.engine.step import GradientSync, StepOptions, train_step
from dynbatch_core.engine.evaluation import average_buffers, recompute_batch_norm
from dynbatch_core.engine.sampler import DynamicBatchSampler

pytestmark = pytest.mark.slow


def in_group(rank: int, world_size: int, store_file: str, results, jobs) -> None:
    """Spawned: join a gloo group through a file store, run each job(rank, world_size) in turn, report each result."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_file, world_size), rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=20))
    try:
        for name, job in jobs.items():
            try:
                results.put((name, rank, "ok", job(rank, world_size)))
            except Exception as error:  # noqa: BLE001 - the test inspects it
                results.put((name, rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()
    exit_without_teardown(0)


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """Every job below, run once in one 2-rank group (one spawn: each costs seconds): {job: {rank: (status, value)}}."""
    folder = tmp_path_factory.mktemp("group")
    jobs = {"empty slice": step_with_an_empty_slice, "disagreement": disagreeing_split,
            "separate folders": NewestCheckpoint([folder / "node0", folder / "node1"], [[10], [10, 20]]),
            "no checkpoint": NewestCheckpoint([folder / "empty0", folder / "empty1"], [[], []]),
            "same step, other states": NewestCheckpoint([folder / "same0", folder / "same1"], [[40], [40]]),
            "buffers": weighted_buffers, "sample order": disagreeing_order, "unused parameter": unused_parameter,
            "micro-batches": micro_batches_on_an_uneven_split, "precise bn": precise_batch_norm_passes}
    for job in jobs.values():
        getattr(job, "setup", lambda: None)()
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(in_group, args=(2, str(folder / "store"), results, jobs), nprocs=2, start_method="spawn")
    found: dict[str, dict] = {name: {} for name in jobs}
    while not results.empty():
        name, rank, status, value = results.get()
        found[name][rank] = (status, value)
    found["folder"] = folder
    return found


class CountsInForward(torch.nn.Module):
    """A model with a collective inside forward (as SyncBatchNorm and DDP's reducer have)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        count = torch.tensor([float(len(x))])
        dist.all_reduce(count)  # every rank must get here, every step
        return self.linear(x) * (1.0 + 0.0 * count)


def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, generator=generator), torch.tensor([0, 2, 1])


def step_with_an_empty_slice(rank: int, world_size: int):
    images, labels = data()
    mine = slice(0, 3) if rank == 0 else slice(3, 3)  # rank 1 holds 0 samples
    model = CountsInForward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train_step(model, optimizer, images[mine], labels[mine], global_batch=3, rank=rank,
                        sync=GradientSync(model.parameters(), world_size=world_size))
    return result.rank_batches, [p.detach().clone().tolist() for p in model.parameters()]


def test_a_rank_with_an_empty_slice_still_joins_the_collectives_of_forward(group_results):
    found = group_results["empty slice"]
    assert [found[rank][0] for rank in (0, 1)] == ["ok", "ok"], found
    model = CountsInForward()
    model.forward = lambda x: model.linear(x)  # the same model, alone
    images, labels = data()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    with torch.no_grad():
        expected = [(p - 0.1 * p.grad).tolist() for p in model.parameters()]
    for rank in (0, 1):
        batches, params = found[rank][1]
        assert batches == [3, 0]
        for got, want in zip(params, expected):
            assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-6)


def disagreeing_split(rank: int, world_size: int):
    check_ranks_agree({"global batch": 64, "split": [16, 48] if rank == 0 else [48, 16], "step": 7},
                      where="at the start of epoch 2")


def test_the_agreement_guard_names_every_ranks_values(group_results):
    found = group_results["disagreement"]
    for rank in (0, 1):
        status, message = found[rank]
        assert status == "error"
        assert message.startswith("RuntimeError: ranks disagree on global batch / split / step at the start of epoch "
                                  "2 (rank 0: global batch=64, split=[16, 48], step=7; rank 1: global batch=64, "
                                  "split=[48, 16], step=7)")


class NewestCheckpoint:
    """A job: newest_checkpoint with each rank given its own run folder (two nodes whose --out are not shared)."""

    def __init__(self, folders, steps):
        self.folders, self.steps = [str(folder) for folder in folders], steps

    def setup(self) -> None:
        for folder, steps in zip(self.folders, self.steps):
            for step in steps:
                save_checkpoint(Path(folder), step=step, world_size=2, state={"ranks": [], "tag": f"{folder}:{step}"})

    def __call__(self, rank: int, world_size: int):
        found = newest_checkpoint(Path(self.folders[rank]))
        return None if found is None else (str(found.folder), found.state["tag"])


def test_the_rank_that_holds_the_newest_checkpoint_hands_it_to_every_rank(group_results):
    folder = group_results["folder"]
    newest = (str(folder / "node1" / "checkpoints" / "step-00000020"), f"{folder / 'node1'}:20")
    assert group_results["separate folders"] == {0: ("ok", newest), 1: ("ok", newest)}  # node0 holds only step 10
    assert group_results["no checkpoint"] == {0: ("ok", None), 1: ("ok", None)}


def test_two_folders_holding_different_checkpoints_of_one_step_resume_one_state_on_every_rank(group_results):
    """Each rank used to load its own file when the step numbers agreed: two nodes then trained on from different
    weights. Now the checkpoints' ids differ, so the first holder's state is broadcast."""
    folder = group_results["folder"]
    first = (str(folder / "same0" / "checkpoints" / "step-00000040"), f"{folder / 'same0'}:40")
    assert group_results["same step, other states"] == {0: ("ok", first), 1: ("ok", first)}


def disagreeing_order(rank: int, world_size: int):
    """Rank 1 cuts another permutation (a node with another torch build): caught at the start of the epoch."""
    sampler = DynamicBatchSampler(1000, rank=rank, world_size=world_size, seed=0 if rank == 0 else 1)
    sampler.seed = 0   # same settings everywhere; rank 1's order differs as another torch build's would
    if rank == 1:
        import dynbatch_core.engine.sampler as module
        original = module.epoch_order
        module.epoch_order = lambda n, seed, epoch, shuffle=True: original(n, seed + 1, epoch, shuffle)
    check_ranks_agree({"global batch": 64, "sample order": sampler.order_fingerprint()}, where="at the start of epoch 1")


def test_ranks_that_cut_different_sample_orders_fail_in_one_line_at_the_epoch_start(group_results):
    for rank in (0, 1):
        status, message = group_results["sample order"][rank]
        assert status == "error" and message.startswith(
            "RuntimeError: ranks disagree on global batch / sample order at the start of epoch 1 (rank 0: global "
            "batch=64, sample order=")


class Heads(torch.nn.Module):
    """`aux` is reached by no rank's loss; `left` by rank 0's only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.left, self.aux = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)

    def forward(self, x, use_left):
        return self.body(x) + (self.left(x) if use_left else 0.0)


def unused_parameter(rank: int, world_size: int):
    model = Heads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(rank))
    sync = GradientSync(model.parameters(), world_size=world_size)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(x, use_left=rank == 0).sum().backward()
        sync.all_reduce(torch.zeros(1))
        optimizer.step()
    return model.aux.weight.grad is None, (model.aux.weight - Heads().aux.weight).abs().max().item(), \
        model.left.weight.grad is not None


def test_a_parameter_no_rank_used_keeps_no_gradient_and_does_not_move(group_results):
    """GradientSync used to give it a zero gradient, which momentum and weight decay then moved (0.027 here)."""
    for rank in (0, 1):
        assert group_results["unused parameter"][rank] == ("ok", (True, 0.0, True))


def micro_batches_on_an_uneven_split(rank: int, world_size: int):
    """Split [3, 13] in micro-batches of 4, with a collective in every forward: 1 vs 4 forwards used to pair one
    rank's forward collective with the other's gradient all-reduce (a hang until the timeout)."""
    images, labels = torch.randn(16, 4, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 3
    mine = slice(0, 3) if rank == 0 else slice(3, 16)
    model = CountsInForward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, optimizer, images[mine], labels[mine], global_batch=16, rank=rank,
               sync=GradientSync(model.parameters(), world_size=world_size), options=StepOptions(max_micro_batch=4),
               largest_slice=13)
    return [p.detach().clone().tolist() for p in model.parameters()]


def test_micro_batches_on_an_uneven_split_run_in_lockstep_and_match_one_process(group_results):
    found = group_results["micro-batches"]
    assert [found[rank][0] for rank in (0, 1)] == ["ok", "ok"], found
    model = CountsInForward()
    images, labels = torch.randn(16, 4, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 3
    torch.nn.functional.cross_entropy(model.linear(images), labels).backward()
    with torch.no_grad():
        expected = [(p - 0.1 * p.grad).tolist() for p in model.parameters()]
    for rank in (0, 1):
        for got, want in zip(found[rank][1], expected):
            assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-6)


class NormCountsForwards(torch.nn.Module):
    """Batch norm plus a collective in every forward (as SyncBatchNorm has); counts its forwards."""

    def __init__(self):
        super().__init__()
        self.norm, self.forwards = torch.nn.BatchNorm2d(1), 0

    def forward(self, x):
        self.forwards += 1
        count = torch.tensor([float(len(x))])
        dist.all_reduce(count)
        return self.norm(x)


class Pixels:
    def __len__(self):
        return 600

    def __getitems__(self, indices):
        index = torch.tensor(indices, dtype=torch.float32)
        return index.view(-1, 1, 1, 1).expand(-1, 1, 2, 2) / 600, torch.zeros(len(indices), dtype=torch.long)


def precise_batch_norm_passes(rank: int, world_size: int):
    """513 samples on 2 ranks: 256 and 257, so 1 and 2 passes of 256 before; now 2 on each."""
    model = NormCountsForwards()
    recompute_batch_norm(model, Pixels(), samples=513, rank=rank, world_size=world_size,
                         device=torch.device("cpu"), batch_size=256)
    return model.forwards, round(model.norm.running_mean.item(), 6)


def test_precise_batch_norm_runs_as_many_passes_on_every_rank_with_the_same_statistics(group_results):
    expected_mean = round(sum(range(513)) / 513 / 600, 6)
    assert group_results["precise bn"] == {0: ("ok", (2, expected_mean)), 1: ("ok", (2, expected_mean))}


def weighted_buffers(rank: int, world_size: int):
    norm = torch.nn.BatchNorm1d(2)
    norm.running_mean.fill_(1.0 if rank == 0 else 5.0)   # rank 0 trained on 3 samples, rank 1 on 9
    norm.num_batches_tracked.fill_(4)
    average_buffers(norm, 3 if rank == 0 else 9, device=torch.device("cpu"))
    return norm.running_mean.tolist(), norm.num_batches_tracked.item()


def test_evaluation_averages_batch_norm_statistics_weighted_by_each_ranks_samples(group_results):
    # (3 x 1 + 9 x 5) / 12 = 4, not the unweighted 3
    assert group_results["buffers"] == {0: ("ok", ([4.0, 4.0], 4)), 1: ("ok", ([4.0, 4.0], 4))}


def test_ranks_agree_on_a_fresh_round_name_whatever_an_earlier_round_left_in_the_store():
    """An earlier round left a hello never answered, a reply never read and an acknowledgement; the new round (whose
    ranks are numbered alike) still agrees on one new name."""
    import threading
    store = dist.HashStore()
    store.set("dynbatch/hello/1", "old-hello")
    store.set("dynbatch/reply/1", "older-hello:old-round")
    store.set("dynbatch/ack/1", "old-round")
    names = {}

    def rank(number):
        names[number] = agree_on_round(store, number, 3, timeout_s=20)

    threads = [threading.Thread(target=rank, args=(number,)) for number in (2, 1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(set(names.values())) == 1 and len(names) == 3
    assert names[0] not in ("old-round", "")
