"""Guards against silently wrong numbers, each in one process: the step under batch norm and micro-batches, the
planned loader's empty slices and refusals, GPU checks under torchrun, the elastic resume's lost checkpoint."""
import copy
import dataclasses
from collections import namedtuple

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate

import dynbatch_core.engine.distributed as distributed
from dynbatch_core import RunConfig
from dynbatch_core.engine.elastic import ResumeState, check_nothing_lost, record_published
from dynbatch_core.engine.loader import planned_loader, prefetch_depth
from dynbatch_core.models import build_model
from dynbatch_core.engine.sampler import DynamicBatchSampler
from dynbatch_core.engine.step import GradientSync, StepOptions, micro_batch_count, micro_batches, train_step
from dynbatch_core.engine.validation import check_same_computation, validate_config


# --- the step -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_measuring_the_noise_scale_at_one_rank_leaves_the_update_unchanged(norm):
    """At one rank the noise scale needs a second batch size: without batch norm the step runs as its two halves
    (the same update up to float order); with it, a side pass measures the half. Batch norm used to normalise each
    half on its own and update the running statistics twice: weights off by 2e-3 after one step."""
    torch.manual_seed(0)
    images, labels = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    base = build_model("resnet8", in_channels=1, num_classes=10, norm=norm)
    states, points = [], []
    for measure in (False, True):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        result = train_step(model, optimizer, images, labels, global_batch=64, rank=0,
                            sync=GradientSync(model.parameters(), world_size=1),
                            options=StepOptions(measure_noise=measure))
        states.append(model.state_dict())
        points.append(result.noise_points)
    exact = norm == "batch"   # the side pass leaves the step itself bit for bit as it was
    for key in states[0]:
        if exact:
            assert torch.equal(states[0][key], states[1][key]), key
        else:
            assert torch.allclose(states[0][key].float(), states[1][key].float(), atol=1e-6), key
    (half, half_sq), (whole, whole_sq) = points[1]
    assert (half, whole) == (32, 64) and half_sq > 0 and whole_sq > 0


def test_every_rank_runs_as_many_micro_batches_as_the_largest_slice_needs():
    """A collective inside the model (SyncBatchNorm, FSDP) pairs the i-th forward of every rank: with a split
    [3, 13] and micro-batches of 4 both ranks must run 4, the small one padded with empty micro-batches."""
    assert micro_batch_count(13, 4) == 4 and micro_batch_count(13, None) == 1 and micro_batch_count(0, 4) == 1
    images, labels = torch.randn(3, 2), torch.arange(3)
    chunks = micro_batches(images, labels, 4, count=micro_batch_count(13, 4))
    assert [len(chunk_labels) for _, chunk_labels in chunks] == [3, 0, 0, 0]
    big = micro_batches(torch.randn(13, 2), torch.arange(13), 4, count=4)
    assert [len(chunk_labels) for _, chunk_labels in big] == [4, 4, 4, 1]
    with pytest.raises(ValueError, match="need 4 micro-batches, more than the 2"):
        micro_batches(torch.randn(13, 2), torch.arange(13), 4, count=2)


def test_the_padded_micro_batches_leave_the_update_unchanged():
    torch.manual_seed(0)
    images, labels = torch.randn(3, 1, 16, 16), torch.randint(0, 10, (3,))
    base = build_model("resnet8", in_channels=1, num_classes=10, norm="group")
    weights = []
    for largest_slice in (None, 13):   # alone, and as the small rank beside a 13-sample one (3 empty chunks)
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, optimizer, images, labels, global_batch=16, rank=0,
                   sync=GradientSync(model.parameters(), world_size=1), options=StepOptions(max_micro_batch=4),
                   largest_slice=largest_slice)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_gradient_buckets_hold_one_dtype_each():
    """A float32 gradient in a bfloat16 bucket would be summed in bfloat16."""
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(2)),
              torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(5))]
    sync = GradientSync(params, world_size=2)
    assert [[p.numel() for p in bucket] for bucket in sync.buckets] == [[3, 4], [2, 5]]
    assert [buffer.dtype for buffer in sync.buffers] == [torch.bfloat16, torch.float32]


def test_wrap_ddp_refuses_compiled_autograds_python_reducer(monkeypatch):
    """In that mode DDP calls comm hooks per parameter with a (grad, param) tuple: the summing hook crashed with
    AttributeError mid-backward; now one line before DDP is built."""
    import torch._dynamo
    from dynbatch_core.engine.ddp_step import summing_hook, wrap_ddp
    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", "python_reducer")
    with pytest.raises(ValueError, match="needs DDP's C\\+\\+ reducer, not compiled autograd's Python reducer"):
        wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="Python reducer"):
        summing_hook(None, (torch.zeros(2), torch.nn.Parameter(torch.zeros(2))))


# --- the planned loader -------------------------------------------------------------------------------------

Sample = namedtuple("Sample", "features label")


class Records(Dataset):
    """An ordinary per-sample dataset of dicts, namedtuples and strings: what default_collate cannot take empty."""

    def __len__(self):
        return 38

    def __getitem__(self, index):
        return {"x": Sample(torch.full((3,), float(index)), index % 2), "name": f"s{index}"}


class Pairs(Records):
    def __getitem__(self, index):
        return torch.full((3,), float(index)), index % 2


def test_an_empty_slice_arrives_as_an_empty_batch_of_the_usual_structure_not_a_collate_crash():
    # 38 samples, split [19, 18]: the second step holds the one left, on rank 0 ([1, 0])
    sampler = DynamicBatchSampler(38, rank=1, world_size=2, seed=0, require_plans=True)
    sampler.set_epoch(0)
    for step in range(3):
        sampler.plan_step(step, [19, 18])
    batches = list(planned_loader(Records(), sampler, collate_fn=default_collate))
    (last, plan) = batches[-1]
    assert plan.rank_batches == [1, 0] and len(plan) == 0
    assert last["x"].features.shape == (0, 3) and last["x"].label.shape == (0,) and last["name"] == []
    assert isinstance(last["x"], Sample)
    pairs = DynamicBatchSampler(38, rank=1, world_size=2, seed=0, require_plans=True)   # tuples: collated as a list
    pairs.set_epoch(0)
    for step in range(3):
        pairs.plan_step(step, [19, 18])
    (features, labels), _ = list(planned_loader(Pairs(), pairs, collate_fn=default_collate))[-1]
    assert features.shape == (0, 3) and labels.shape == (0,)
    full, _ = batches[0]
    assert full["x"].features.shape == (18, 3)
    model = torch.nn.Linear(3, 2)   # it still runs forward and backward: a zero-valued loss
    loss = torch.nn.functional.cross_entropy(model(last["x"].features), last["x"].label, reduction="sum") / 1
    loss.backward()
    assert loss.item() == 0.0 and model.weight.grad.abs().max().item() == 0.0


def test_a_one_sample_slice_is_legal_and_batchnorm1d_in_training_refuses_it():
    """The documented contract: the short last step may leave one sample on a rank. BatchNorm2d normalises it over
    its pixels; BatchNorm1d cannot (torch raises), so models with it need GroupNorm/LayerNorm or more samples."""
    assert torch.nn.BatchNorm2d(3)(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm1d(3)(torch.randn(1, 3))


def test_the_lookahead_comes_from_the_loaders_own_options_and_in_order_false_is_refused():
    sampler = DynamicBatchSampler(64, rank=0, world_size=2, require_plans=True)
    loader = planned_loader(Records(), sampler, num_workers=2, prefetch_factor=4)
    assert prefetch_depth(loader) == 8
    assert prefetch_depth(planned_loader(Records(), sampler)) == 0
    with pytest.raises(TypeError, match="takes the DataLoader itself"):
        prefetch_depth(2)
    with pytest.raises(ValueError, match="in_order=False would hand batches out of step order"):
        planned_loader(Records(), sampler, num_workers=2, in_order=False)


def test_a_planned_samplers_state_needs_the_trained_step():
    """The cursor alone is as far as a prefetching loader read ahead: a resume from it skipped those steps."""
    sampler = DynamicBatchSampler(64, rank=0, world_size=2, require_plans=True)
    with pytest.raises(TypeError, match="pass the plan of the last step trained"):
        sampler.state_dict()
    assert sampler.state_dict(trained=None)["cursor"] == 0
    assert DynamicBatchSampler(64, rank=0, world_size=2).state_dict()["cursor"] == 0


# --- validation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(device="cuda"), dict(device="auto", precision="fp16"),
                                     dict(device="auto", sync_bn=True)])
def test_two_one_gpu_nodes_under_torchrun_may_use_cuda(options, monkeypatch, tmp_path):
    """Each node brings its own GPU: the checks count this node's ranks (LOCAL_WORLD_SIZE), not the job's."""
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 1)
    config = RunConfig(dataset="synthetic", world_size=2, out=str(tmp_path / "run"), **options)
    validate_config(config, local_world_size=1)
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", TORCHELASTIC_RUN_ID="x").items():
        monkeypatch.setenv(name, value)
    validate_config(config)   # a torchrun process reads its LOCAL_WORLD_SIZE
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError):   # both ranks on one 1-GPU machine: still refused
        validate_config(config)


def test_a_resume_under_batch_norm_may_not_change_the_micro_batches():
    stored = RunConfig(norm="batch", max_micro_batch=8)
    with pytest.raises(ValueError, match="--max-micro-batch was 8 in that run, now 4; under --norm batch"):
        check_same_computation(stored, dataclasses.replace(stored, max_micro_batch=4), where="--resume x")
    grouped = RunConfig(norm="group", max_micro_batch=8)
    check_same_computation(grouped, dataclasses.replace(grouped, max_micro_batch=4), where="--resume x")


# --- elastic resume -------------------------------------------------------------------------------------------

def test_a_torchrun_round_that_finds_less_than_the_job_published_stops_in_one_line(tmp_path):
    """The node that held the newest checkpoint left and the folders are not shared: the survivors used to start
    over from step 0 in silence."""
    store = dist.HashStore()
    check_nothing_lost(store, None, tmp_path)            # nothing published yet (died before its first checkpoint)
    record_published(store, 40)
    with pytest.raises(ValueError, match=r"published a checkpoint at step 40, but its ranks find no checkpoint in "
                                         r"their run folders \(.*\): the node that held it left"):
        check_nothing_lost(store, None, tmp_path)
    with pytest.raises(ValueError, match="find only the checkpoint of step 20"):
        check_nothing_lost(store, ResumeState(tmp_path, {"step": 20}), tmp_path)
    check_nothing_lost(store, ResumeState(tmp_path, {"step": 40}), tmp_path)
    check_nothing_lost(None, None, tmp_path)             # a spawned run has no job store
