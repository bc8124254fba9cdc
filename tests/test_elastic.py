"""Elastic: a run resumed on another number of ranks follows the uninterrupted run (same global batches, norm none)."""
import pytest
import torch

from dynbatch_core import RunConfig, RunFailed, run
from dynbatch_core.engine.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.slow
SAMPLES = 512


def config(tmp_path, name, **overrides):
    # 512 samples at B = 32 for 3 epochs: 48 steps; SGD with momentum; no batch norm, so the split cannot matter
    values = dict(dataset="synthetic", model="resnet8", norm="none", world_size=2, epochs=3, train_samples=SAMPLES,
                  test_samples=64, initial_batch=32, lr=0.05, checkpoint_every=5, progress=False, out=str(tmp_path / name))
    return RunConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(config(tmp_path_factory.mktemp("reference"), "two-ranks"))


def killed_at_step_23(tmp_path, monkeypatch, name):
    monkeypatch.setenv("DYNBATCH_TEST_HOOKS", "1")
    monkeypatch.setenv("DYNBATCH_FAULT", "kill:1:23")  # mid-epoch 2 (steps 16..31); the last checkpoint is step 20
    with pytest.raises(RunFailed):
        run(config(tmp_path, name))
    monkeypatch.delenv("DYNBATCH_FAULT")
    assert latest_checkpoint(tmp_path / name)[1]["step"] == 20


@pytest.mark.parametrize("new_world_size, split", [(3, [11, 11, 10]), (1, [32])])
def test_a_two_rank_run_resumed_on_another_number_of_ranks_ends_with_the_same_weights(
        tmp_path, monkeypatch, uninterrupted, new_world_size, split):
    killed_at_step_23(tmp_path, monkeypatch, "elastic")
    resumed = run(config(tmp_path, "elastic", world_size=new_world_size, resume=str(tmp_path / "elastic")))

    expected = torch.load(uninterrupted.run_dir / "model.pt", weights_only=True)
    actual = torch.load(resumed.run_dir / "model.pt", weights_only=True)
    assert max((expected[key] - actual[key]).abs().max().item() for key in expected) < 1e-5
    steps = resumed.steps
    # every sample once per epoch, 48 steps in all, each step's global batch 32 whatever the number of ranks
    assert steps.groupby("epoch").rank_batch.sum().tolist() == [SAMPLES] * 3
    assert sorted(steps.step.unique()) == list(range(48))
    assert steps.groupby("step").rank_batch.sum().eq(32).all()
    # the tables show where the world size changed: steps 0..19 on 2 ranks, 20.. on the new number
    sizes = steps.groupby("step").world_size.first()
    assert sizes.loc[:19].eq(2).all() and sizes.loc[20:].eq(new_world_size).all()
    assert steps.query("step == 20").sort_values("rank").rank_batch.tolist() == split
    assert resumed.epochs.world_size.tolist() == [2, new_world_size, new_world_size]
    losses = steps.groupby("step").loss.mean()
    reference = uninterrupted.steps.groupby("step").loss.mean()
    assert (losses.loc[:19] - reference.loc[:19]).abs().max() == 0  # the steps before the kill are the originals
    assert resumed.epochs.test_acc.iloc[-1] == pytest.approx(uninterrupted.epochs.test_acc.iloc[-1], abs=1e-9)


def test_the_checkpoint_is_one_file_whatever_the_number_of_ranks(tmp_path):
    result = run(config(tmp_path, "one-file", epochs=1, checkpoint_every=0))
    folder, meta = latest_checkpoint(result.run_dir)
    assert sorted(path.name for path in folder.iterdir()) == ["state.pt"]
    state = load_checkpoint(folder / "state.pt")
    assert (meta["world_size"], state["world_size"], len(state["ranks"])) == (2, 2, 2)


def test_an_old_per_rank_checkpoint_is_refused_in_one_line(tmp_path):
    from dynbatch_core.engine.validation import validate_config
    result = run(config(tmp_path, "old", epochs=1, checkpoint_every=0))
    folder, _ = latest_checkpoint(result.run_dir)
    (folder / "state.pt").rename(folder / "rank0.pt")
    validate_config(config(tmp_path, "old", resume=str(result.run_dir)))   # the folder still looks resumable
    with pytest.raises(RunFailed, match="older format dynbatch-checkpoint-1 .one file per rank.; resume it with that "
                                        "version of dynbatch, or start the run over"):
        run(config(tmp_path, "old", resume=str(result.run_dir)))
