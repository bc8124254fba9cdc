"""Multi-rank behaviour of single functions, in real gloo process groups: an empty slice, the guards."""
import datetime
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynbatch_core.agreement import check_ranks_agree, check_run_dir_shared
from dynbatch_core.distributed import exit_without_teardown
from dynbatch_core.step import GradientSync, train_step
from dynbatch_core.train import average_buffers

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
            "separate folders": FoldersOf(folder / "node0", folder / "node1"),
            "one folder": FoldersOf(folder / "shared", folder / "shared"), "buffers": weighted_buffers}
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


class FoldersOf:
    """A job: check_run_dir_shared with each rank given its own path (two nodes with the same --out on filesystems
    of their own see different folders)."""

    def __init__(self, *folders: Path):
        self.folders = [str(folder) for folder in folders]

    def __call__(self, rank: int, world_size: int):
        return check_run_dir_shared(Path(self.folders[rank]))


def test_a_run_folder_that_is_not_shared_between_ranks_is_refused(group_results):
    found, folder = group_results["separate folders"], group_results["folder"]
    assert [found[rank][0] for rank in (0, 1)] == ["error", "error"]
    assert found[1][1].startswith(f"ValueError: run folder {folder / 'node1'} is not shared: rank(s) 1 do not see "
                                  "rank 0's files there; multi-node runs need one run folder")
    assert group_results["one folder"] == {0: ("ok", None), 1: ("ok", None)}
    assert list((folder / "shared").iterdir()) == []  # the check cleans up after itself


def weighted_buffers(rank: int, world_size: int):
    norm = torch.nn.BatchNorm1d(2)
    norm.running_mean.fill_(1.0 if rank == 0 else 5.0)   # rank 0 trained on 3 samples, rank 1 on 9
    norm.num_batches_tracked.fill_(4)
    average_buffers(norm, 3 if rank == 0 else 9, device=torch.device("cpu"))
    return norm.running_mean.tolist(), norm.num_batches_tracked.item()


def test_evaluation_averages_batch_norm_statistics_weighted_by_each_ranks_samples(group_results):
    # (3 x 1 + 9 x 5) / 12 = 4, not the unweighted 3
    assert group_results["buffers"] == {0: ("ok", ([4.0, 4.0], 4)), 1: ("ok", ([4.0, 4.0], 4))}
