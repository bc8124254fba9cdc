"""Every rank trains the same global batch and split, even when the ranks' clocks disagree about an epoch's time."""
import pytest

from dynbatch_core import RunConfig, build_schedule, run
from dynbatch_core.batching.schedules import EpochSummary

pytestmark = pytest.mark.slow

# Rank 0 sleeps 2.5 s at the start of epoch 1, after the epoch's decision: rank 1 waits for it inside its own timed
# epoch, so rank 1 measures an epoch ~2.5 s longer than rank 0. An epoch of 256 samples otherwise takes ~0.2 s.
STALL = "stall:0:1:2.5"
CASES = {
    # time budget 1 s: epoch 0 stays under it, the stalled epoch 1 runs over -> B doubles once
    "loss-plateau": (dict(schedule="loss-plateau", time_budget_s=1.0, plateau_window=5), [32, 32, 64]),
    # first move doubles; the stalled epoch's score (0.2 x t1/t0 ~ 3) is far worse -> the move is reversed
    "score": (dict(schedule="score"), [32, 64, 32]),
    # equal log-loss slope for two probes: the faster epoch wins, and the stalled probe (64) is the slower one
    "probe": (dict(schedule="probe", probe_sizes=(32, 64)), [32, 64, 32]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_time_based_schedules_decide_the_same_batch_on_every_rank(tmp_path, monkeypatch, name):
    options, expected = CASES[name]
    monkeypatch.setenv("DYNBATCH_TEST_HOOKS", "1")
    monkeypatch.setenv("DYNBATCH_FAULT", STALL)
    result = run(RunConfig(dataset="synthetic", model="resnet8", world_size=2, epochs=3, train_samples=256,
                           test_samples=64, initial_batch=32, progress=False, timeout_s=20, out=str(tmp_path / name),
                           **options))
    steps = result.steps
    per_step = steps.groupby("step").global_batch.nunique()
    assert (per_step == 1).all(), steps[steps.step.isin(per_step[per_step > 1].index)]
    assert (steps.groupby("step").rank_batch.sum() == steps.groupby("step").global_batch.first()).all()
    assert steps.groupby("epoch").rank_batch.sum().tolist() == [256, 256, 256]  # every sample once per epoch
    assert result.epochs.global_batch.tolist() == expected
    assert result.epochs.epoch_s.iloc[1] > 2.5  # the epoch's time is the slowest rank's, on every rank
    if name in ("score", "probe"):   # epochs.csv holds the scores the decisions came from
        schedule = build_schedule(name, initial_batch=32, min_batch=2, **options)
        history = [EpochSummary(int(e.epoch), int(e.global_batch), e.train_loss, e.epoch_s)
                   for e in result.epochs.itertuples()]
        scores = result.epochs.schedule_score.dropna().tolist()
        assert scores == pytest.approx(schedule.epoch_scores(history)) and len(scores) == (2 if name == "probe" else 3)
        if name == "probe":
            assert scores[1] < scores[0]   # the stalled probe scored lower, so B went back to 32


def test_max_rank_batch_caps_a_growing_schedule_instead_of_failing_mid_run(tmp_path):
    result = run(RunConfig(dataset="synthetic", model="resnet8", world_size=2, epochs=3, train_samples=128,
                           test_samples=32, initial_batch=32, schedule="increasing", max_rank_batch=20, progress=False,
                           out=str(tmp_path / "capped")))
    assert result.epochs.global_batch.tolist() == [32, 40, 40]
    assert result.steps.rank_batch.max() == 20
