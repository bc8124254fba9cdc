"""FSDP2 with the exact summing contract (engine/fsdp.py), in one real 2-rank gloo group (one spawn: each costs
seconds): every check runs in fsdp_checks, rank 0 saves the numbers, the tests compare them with one process."""
import datetime
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from dynbatch_core.batching.noise_scale import step_points
from dynbatch_core.engine.distributed import exit_without_teardown
from dynbatch_core.engine.fsdp import (fsdp_train_step, full_model_state, full_optimizer_state, is_fsdp,
                                       load_full_state, prepare_fsdp, shard_per_block)
from dynbatch_core.engine.step import StepOptions
from dynbatch_core.models import BasicBlock, build_model

pytestmark = pytest.mark.slow

# (global batch, per-rank split) of each step: uneven, another split every step, rank 0 empty in the second
STEPS = [(48, (10, 38)), (48, (0, 48)), (48, (30, 18)), (20, (5, 15))]
RESUMED_STEP = (48, (20, 28))   # step 4, after a checkpoint of steps 0-3
NO_EMPTY_SLICE = [0, 2, 3]      # the steps a per-rank mean can take (a mean over no samples is NaN)
NOISE_STEPS = [0, 1]
LR, MOMENTUM, CLIP = 0.1, 0.9, 0.1
TIMED_STEPS, WARM_UP, SLEEP_S = 20, 4, 0.010   # timing: steps after the warm-up alternate equal / rank 1 slow
# Blocks of 512 x 512 (a step of ~35 ms here): at 256 wide rank 0's compute read 7-26 % higher in rank 1's slow
# steps, as if each compute segment after a long wait ran slower (not inside the collectives the clock subtracts).
TIMED_WIDTH = 512
RANK1_SLOW = [False]


def mlp(width: int = 16, hidden: int = 32, blocks: int = 3, classes: int = 5) -> nn.Sequential:
    """Blocks of Linear + ReLU, then a head; 5 classes, so the head's shards are uneven (3 + 2 rows: padding)."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(width if i == 0 else hidden, hidden), nn.ReLU()) for i in range(blocks)]
    return nn.Sequential(*layers, nn.Linear(hidden, classes))


def sharded(model: nn.Sequential, **fsdp_options) -> nn.Sequential:
    """fully_shard on each block (the inner Sequentials), then on the root, which holds the head."""
    return shard_per_block(model, (nn.Sequential,), **fsdp_options)


def step_data(index: int, global_batch: int, width: int = 16, classes: int = 5):
    generator = torch.Generator().manual_seed(100 + index)
    return torch.randn(global_batch, width, generator=generator), \
        torch.randint(0, classes, (global_batch,), generator=generator)


def rank_slice(index: int, global_batch: int, split, rank: int):
    images, labels = step_data(index, global_batch)
    start = sum(split[:rank])
    return images[start:start + split[rank]], labels[start:start + split[rank]]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


# --- in the ranks ---------------------------------------------------------------------------------------------------

def fsdp_checks(rank: int, world_size: int, folder: str) -> None:
    """Spawned: every FSDP check in one gloo group; rank 0 saves the numbers to folder/results.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", world_size), rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    results = {}
    model, optimizer, steps = train_exact(rank, STEPS)
    results["exact"] = {"weights": full_model_state(model), "rank batches": [step.rank_batches for step in steps]}
    results["contract"] = contract(model)
    save_full_state(rank, model, optimizer, f"{folder}/full.pt")
    results["resumed on 2 ranks"] = resumed(rank, f"{folder}/full.pt")
    model, _, _ = train_exact(rank, STEPS, StepOptions(max_micro_batch=4, clip_grad_norm=CLIP))
    results["micro-batches, clipped"] = full_model_state(model)
    results["fsdp default"] = fsdp_default(rank)
    results["noise"] = noise(rank)
    results["timing"] = timing(rank)
    dist.destroy_process_group()
    if rank == 0:   # the checkpoint of 2 ranks, resumed on 1
        dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store1", 1), rank=0, world_size=1)
        results["resumed on 1 rank"] = resumed(0, f"{folder}/full.pt", world_size=1)
        dist.destroy_process_group()
        torch.save(results, f"{folder}/results.pt")
    exit_without_teardown(0)


def train_exact(rank: int, steps, options: StepOptions = StepOptions()):
    model = sharded(mlp())
    prepare_fsdp(model)
    optimizer = sgd(model)
    results = [fsdp_train_step(model, optimizer, *rank_slice(index, batch, split, rank), global_batch=batch,
                               rank=rank, options=options, largest_slice=max(split))
               for index, (batch, split) in enumerate(steps)]
    return model, optimizer, results


def contract(model: nn.Module) -> dict:
    """What FSDP stores after prepare_fsdp, and what prepare_fsdp says to mixed-precision policies."""
    groups = [group for module in model.modules() if isinstance(module, FSDPModule)
              for group in module._get_fsdp_state()._fsdp_param_groups]
    found = {"is_fsdp": is_fsdp(model),
             "fsdp modules": sum(isinstance(module, FSDPModule) for module in model.modules()),
             "divide factors": [group.gradient_divide_factor for group in groups],
             "forced sum": [group.force_sum_reduction_for_comms for group in groups],
             "comms": sorted({type(group._all_gather_comm).__name__ for group in groups} |
                             {type(group._reduce_scatter_comm).__name__ for group in groups}),
             "clock": model.clock is groups[0]._reduce_scatter_comm.clock}
    try:
        prepare_fsdp(sharded(mlp(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)))
        found["bf16 alone"] = "accepted"
    except ValueError as error:
        found["bf16 alone"] = str(error)
    prepare_fsdp(sharded(mlp(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                               reduce_dtype=torch.float32)))
    found["bf16, float32 reduction"] = "accepted"
    resnet = shard_per_block(build_model("resnet8", norm="group"))
    found["resnet8 sharded"] = sorted(type(module).__name__ for module in resnet.modules()
                                      if isinstance(module, FSDPModule))
    return found


def save_full_state(rank: int, model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    state = {"model": full_model_state(model), "optimizer": full_optimizer_state(model, optimizer)}
    if rank == 0:
        torch.save(state, path)
    dist.barrier()


def resumed(rank: int, path: str, world_size: int = 2) -> dict:
    """A fresh model and optimizer loaded from the one-file checkpoint, one more step: the weights, the clock."""
    state = torch.load(path, weights_only=True)
    model = sharded(mlp())
    clock = prepare_fsdp(model)
    optimizer = sgd(model)
    load_full_state(model, optimizer, state["model"], state["optimizer"])
    batch, split = RESUMED_STEP if world_size == 2 else (RESUMED_STEP[0], (RESUMED_STEP[0],))
    result = fsdp_train_step(model, optimizer, *rank_slice(len(STEPS), batch, split, rank), global_batch=batch,
                             rank=rank)
    return {"weights": full_model_state(model), "compute_s": result.compute_s, "reduced": clock.reduced,
            "to_reduce": clock.to_reduce}


def fsdp_default(rank: int) -> dict:
    """No prepare_fsdp, each rank's loss its own mean, as a plain FSDP loop would have it."""
    model = sharded(mlp())
    optimizer = sgd(model)
    for index in NO_EMPTY_SLICE:
        batch, split = STEPS[index]
        images, labels = rank_slice(index, batch, split, rank)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return full_model_state(model)


def noise(rank: int) -> list:
    model = sharded(mlp())
    prepare_fsdp(model)
    optimizer = sgd(model)
    return [fsdp_train_step(model, optimizer, *rank_slice(index, *STEPS[index], rank), global_batch=STEPS[index][0],
                            rank=rank, options=StepOptions(measure_noise=True)).noise_points
            for index in NOISE_STEPS]


def timing(rank: int) -> dict:
    """compute_s per step (every rank's) at equal speed and with rank 1 sleeping in every block's forward and
    backward, the two alternating step by step (this machine's other load then weighs on both alike)."""
    model = sharded(mlp(width=TIMED_WIDTH, hidden=TIMED_WIDTH, blocks=4, classes=10))
    prepare_fsdp(model)
    optimizer = sgd(model)
    if rank == 1:
        for block in list(model)[:-1]:
            block.register_forward_hook(sleep_in_forward_and_backward)
    images, labels = step_data(0, 64, width=TIMED_WIDTH, classes=10)
    mine = slice(32 * rank, 32 * (rank + 1))
    found = {"equal": [], "rank 1 slow": []}
    for step in range(WARM_UP + TIMED_STEPS):
        RANK1_SLOW[0] = step >= WARM_UP and step % 2 == 1
        result = fsdp_train_step(model, optimizer, images[mine], labels[mine], global_batch=64, rank=rank)
        if step >= WARM_UP:
            found["rank 1 slow" if RANK1_SLOW[0] else "equal"].append(result.compute_s)
    return found


def sleep_in_forward_and_backward(module, inputs, output):
    if RANK1_SLOW[0]:
        time.sleep(SLEEP_S)
        if output.requires_grad:
            output.register_hook(lambda grad: time.sleep(SLEEP_S))


# --- in the test process ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fsdp")
    started = time.perf_counter()
    mp.start_processes(fsdp_checks, args=(2, str(folder)), nprocs=2, start_method="spawn")
    results = torch.load(folder / "results.pt", weights_only=False)
    results["seconds"] = time.perf_counter() - started
    return results


def one_process(steps, *, clip: float | None = None, first: int = 0):
    """The plain model on the union batches, mean loss; returns (state, pre-clip gradient norms)."""
    model = mlp()
    optimizer = sgd(model)
    norms = []
    for index, (batch, _) in enumerate(steps, start=first):
        images, labels = step_data(index, batch)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        optimizer.step()
    return model.state_dict(), norms


def max_difference(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max((got[name] - want[name]).abs().max().item() for name in want)


def test_uneven_splits_that_change_every_step_match_one_process_on_the_union_batch(fsdp_results):
    exact = fsdp_results["exact"]
    assert exact["rank batches"] == [list(split) for _, split in STEPS]
    assert max_difference(exact["weights"], one_process(STEPS)[0]) <= 1e-5


def test_micro_batches_of_4_and_clipping_the_global_norm_match_one_process(fsdp_results):
    want, norms = one_process(STEPS, clip=CLIP)
    assert min(norms) > CLIP   # every step really clips
    assert max_difference(fsdp_results["micro-batches, clipped"], want) <= 1e-5


def test_fsdp_default_averages_rank_means_and_misses_the_union_batch(fsdp_results):
    """Without prepare_fsdp each rank's mean gradient counts alike: a sample of a 5-sample rank weighs 3x one of a
    15-sample rank."""
    model = mlp()
    optimizer = sgd(model)
    for index in NO_EMPTY_SLICE:
        batch, split = STEPS[index]
        rank_means = []
        for rank in range(2):
            model.zero_grad()
            F.cross_entropy(model(rank_slice(index, batch, split, rank)[0]), rank_slice(index, batch, split, rank)[1]
                            ).backward()
            rank_means.append([param.grad.clone() for param in model.parameters()])
        for param, *grads in zip(model.parameters(), *rank_means):
            param.grad = sum(grads) / len(grads)
        optimizer.step()
    union, _ = one_process([STEPS[index] for index in NO_EMPTY_SLICE])
    got = fsdp_results["fsdp default"]
    assert max_difference(got, model.state_dict()) <= 1e-5
    assert max_difference(got, union) > 1e-4


def test_every_fsdp_module_sums_and_bfloat16_reductions_are_refused(fsdp_results):
    found = fsdp_results["contract"]
    assert found["is_fsdp"] and found["fsdp modules"] == 4   # three blocks and the root (which holds the head)
    assert found["divide factors"] == [1.0] * 4 and found["forced sum"] == [True] * 4
    assert found["comms"] == ["TimedAllGather", "TimedReduceScatter"] and found["clock"]
    assert found["bf16 alone"] == (
        "FSDP would sum the gradients of the root in torch.bfloat16; the exact step needs float32 reductions: give "
        "MixedPrecisionPolicy reduce_dtype=torch.float32 (param_dtype=torch.bfloat16 alone reduces in bfloat16)")
    assert found["bf16, float32 reduction"] == "accepted"
    assert found["resnet8 sharded"] == [f"FSDP{BasicBlock.__name__}"] * 3 + ["FSDPResNet"]   # shard_per_block


def test_a_model_without_fully_shard_is_refused_in_one_line():
    model = mlp()
    assert not is_fsdp(model)
    with pytest.raises(ValueError, match=r"^prepare_fsdp needs a model passed through fully_shard \(each block, "
                                         r"then the root\); no module of this one is an FSDPModule$"):
        prepare_fsdp(model)


def test_a_checkpoint_of_2_ranks_resumes_exactly_on_2_and_on_1(fsdp_results):
    want, _ = one_process(STEPS + [RESUMED_STEP])
    for key in ("resumed on 2 ranks", "resumed on 1 rank"):
        assert max_difference(fsdp_results[key]["weights"], want) <= 1e-5, key
    alone = fsdp_results["resumed on 1 rank"]
    assert alone["reduced"] == alone["to_reduce"] == 4 and alone["compute_s"][0] > 0   # the hook stopped the clock


def test_noise_points_are_each_ranks_mean_gradient_and_the_union_batchs(fsdp_results):
    model = mlp()
    optimizer = sgd(model)
    for index, got in zip(NOISE_STEPS, fsdp_results["noise"]):
        batch, split = STEPS[index]
        local = []
        for rank in range(2):
            model.zero_grad()
            images, labels = rank_slice(index, batch, split, rank)
            (F.cross_entropy(model(images), labels, reduction="sum") / batch).backward()
            local.append([param.grad.clone() for param in model.parameters()])
        summed = [sum(grads) for grads in zip(*local)]
        want = step_points([sum(float(g.double().pow(2).sum()) for g in grads) for grads in local], list(split),
                           batch, sum(float(g.double().pow(2).sum()) for g in summed))
        assert [b for b, _ in got] == [b for b, _ in want]
        for (_, got_sq), (_, want_sq) in zip(got, want):
            assert got_sq == pytest.approx(want_sq, rel=1e-5)
        for param, grad in zip(model.parameters(), summed):
            param.grad = grad
        optimizer.step()


def test_compute_time_leaves_out_waiting_for_a_slower_rank(fsdp_results):
    timing = fsdp_results["timing"]
    rank0_equal = statistics.median(step[0] for step in timing["equal"])
    rank0_slow = statistics.median(step[0] for step in timing["rank 1 slow"])
    rank1_slow = statistics.median(step[1] for step in timing["rank 1 slow"])
    print(f"rank 0 median: {rank0_equal * 1e3:.1f} ms equal, {rank0_slow * 1e3:.1f} ms with rank 1 slow; "
          f"rank 1 slow: {rank1_slow * 1e3:.1f} ms; launch {fsdp_results['seconds']:.1f} s")
    assert rank1_slow >= 2 * rank0_slow
    # Waiting counted as compute would bring rank 0 up to rank 1's time; a ~20 ms step here varies by 15 % and more
    # (CI measured 21.5 against 18.5 ms once), so the bound is a share of the wait it must leave out, not of noise.
    assert abs(rank0_slow - rank0_equal) <= 0.25 * (rank1_slow - rank0_equal)
