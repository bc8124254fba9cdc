"""The sampler: exact coverage under changing batch sizes and splits, world-size-free order, resumable state."""
import itertools

import pytest
import torch

from dynbatch_core.engine.sampler import DynamicBatchSampler, epoch_order


def run_epoch(num_samples, world_size, split_for_step, *, seed=0, epoch=0, samplers=None):
    """Drive one sampler per rank in lockstep; return the per-step list of per-rank index lists."""
    samplers = samplers or [DynamicBatchSampler(num_samples, rank=r, world_size=world_size, seed=seed)
                            for r in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    iterators = [iter(s) for s in samplers]
    steps = []
    for step in itertools.count():
        split = split_for_step(step)
        for sampler in samplers:
            sampler.set_rank_batches(split)
        slices = [next(it, None) for it in iterators]
        if slices[0] is None:
            assert all(s is None for s in slices), "ranks disagree on the number of steps"
            return steps
        assert [len(s) for s in slices] == slices[0].rank_batches
        steps.append(slices)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_sample_seen_once_when_batch_and_split_change_mid_epoch(world_size):
    splits = [[1 + (step * 7 + rank * 3) % 11 for rank in range(world_size)] for step in range(50)]
    steps = run_epoch(1000, world_size, lambda step: splits[step % len(splits)])
    seen = [i for step in steps for rank_slice in step for i in rank_slice]
    assert sorted(seen) == list(range(1000))
    assert len(seen) == len(set(seen))
    # the split really changed between steps
    assert len({tuple(len(s) for s in step) for step in steps}) > 10


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_concatenated_rank_slices_follow_the_global_order_whatever_the_world_size(world_size):
    steps = run_epoch(257, world_size, lambda step: [5 + step % 3] * world_size, seed=3, epoch=2)
    concatenated = [i for step in steps for rank_slice in step for i in rank_slice]
    assert concatenated == epoch_order(257, seed=3, epoch=2).tolist()


def test_order_depends_on_seed_and_epoch_only():
    assert epoch_order(100, 0, 1).tolist() == epoch_order(100, 0, 1).tolist()
    assert epoch_order(100, 0, 1).tolist() != epoch_order(100, 0, 2).tolist()
    assert epoch_order(100, 1, 1).tolist() != epoch_order(100, 0, 1).tolist()
    assert sorted(epoch_order(100, 5, 5).tolist()) == list(range(100))


def test_short_last_step_splits_the_remainder_in_proportion():
    steps = run_epoch(100, 2, lambda step: [24, 8])
    assert [[len(s) for s in step] for step in steps] == [[24, 8]] * 3 + [[3, 1]]


def test_rank_may_get_empty_slice_on_the_last_step_but_still_takes_the_step():
    steps = run_epoch(10, 4, lambda step: [1, 1, 1, 1])
    assert [[len(s) for s in step] for step in steps][-1] == [1, 1, 0, 0]
    assert sum(len(s) for step in steps for s in step) == 10


def test_resume_from_state_dict_continues_the_same_sequence():
    split = lambda step: [3 + step % 4, 13 - step % 5]
    reference = run_epoch(500, 2, split, seed=7, epoch=1)

    samplers = [DynamicBatchSampler(500, rank=r, world_size=2, seed=7) for r in range(2)]
    for s in samplers:
        s.set_epoch(1)
    iterators = [iter(s) for s in samplers]
    first_part = []
    for step in range(6):
        for s in samplers:
            s.set_rank_batches(split(step))
        first_part.append([next(it) for it in iterators])
    states = [s.state_dict() for s in samplers]

    resumed = [DynamicBatchSampler(500, rank=r, world_size=2, seed=7) for r in range(2)]
    for sampler, state in zip(resumed, states):
        sampler.load_state_dict(state)
    rest = run_epoch(500, 2, lambda step: split(step + 6), seed=7, epoch=1, samplers=resumed)
    assert first_part + rest == reference


def test_set_epoch_starts_another_epoch_at_its_first_sample_but_continues_the_current_unfinished_one():
    order0, order1 = epoch_order(10, 0, 0).tolist(), epoch_order(10, 0, 1).tolist()
    sampler = DynamicBatchSampler(10, seed=0, rank_batches=[4])
    sampler.set_epoch(0)
    assert next(iter(sampler)) == order0[0:4]
    sampler.set_epoch(0)  # the current, unfinished epoch: continues at sample 4
    assert list(sampler) == [order0[4:8], order0[8:10]]
    sampler.set_epoch(0)  # the current epoch, finished: starts over
    assert next(iter(sampler)) == order0[0:4]
    sampler.set_epoch(1)  # another epoch: its first sample, even though epoch 0 stopped at 4
    assert next(iter(sampler)) == order1[0:4]
    resumed = DynamicBatchSampler(10, seed=0, rank_batches=[4])
    resumed.load_state_dict(sampler.state_dict())  # epoch 1 at cursor 4
    resumed.set_epoch(1)  # what train.py does after loading a checkpoint
    assert list(resumed) == [order1[4:8], order1[8:10]]
    assert (resumed.epoch, resumed.cursor, resumed.steps_in_epoch) == (1, 10, 3)


def test_resume_with_a_different_world_size_recuts_the_same_global_position():
    samplers = [DynamicBatchSampler(64, rank=r, world_size=2, seed=1) for r in range(2)]
    run_epoch(64, 2, lambda step: [4, 4], samplers=samplers)  # exhaust to check state bookkeeping
    state = DynamicBatchSampler(64, rank=0, world_size=2, seed=1).state_dict() | {"cursor": 24, "epoch": 0}
    wider = [DynamicBatchSampler(64, rank=r, world_size=4, seed=1) for r in range(4)]
    for sampler in wider:
        sampler.load_state_dict(state)
    rest = run_epoch(64, 4, lambda step: [2, 2, 2, 2], seed=1, samplers=wider)
    assert [i for step in rest for s in step for i in s] == epoch_order(64, 1, 0).tolist()[24:]


def test_loader_driven_by_the_sampler_changes_batch_size_without_rebuilding():
    dataset = torch.utils.data.TensorDataset(torch.arange(40))
    sampler = DynamicBatchSampler(40, rank=1, world_size=2, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    sampler.set_epoch(0)
    sizes = []
    batches = iter(loader)
    for split in ([2, 2], [1, 5], [3, 9], [5, 5], [5, 5]):
        sampler.set_rank_batches(split)
        sizes.append(len(next(batches)[0]))
    assert sizes == [2, 5, 9, 5, 4]  # 8 samples left for the last step: [4, 4]


def test_state_from_another_dataset_is_refused():
    state = DynamicBatchSampler(10, seed=0).state_dict()
    with pytest.raises(ValueError, match="10 samples"):
        DynamicBatchSampler(11, seed=0).load_state_dict(state)
