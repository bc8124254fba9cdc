"""Multi-rank behaviour of single functions, in real gloo process groups: an empty slice, the guards."""
import datetime
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynbatch_core.agreement import check_ranks_agree
from dynbatch_core.checkpoint import save_checkpoint
from dynbatch_core.distributed import agree_on_round, exit_without_teardown
from dynbatch_core.elastic import newest_checkpoint
from dynbatch_core.step import GradientSync, train_step
from dynbatch_core.evaluation import average_buffers

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
            "buffers": weighted_buffers}
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
