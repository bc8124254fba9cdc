"""The engine on FSDP2 (--gradient-sync fsdp): exact against one process, the same noise-scale points as the DDP
path on the same steps, kill-and-resume bit-exact, and the checkpoint of 2 ranks continued on 3."""
import shutil

import pandas as pd
import pytest
import torch

from dynbatch_core import RunConfig, RunFailed, run

pytestmark = pytest.mark.slow

# pid on an emulated clock: the split changes every few steps, and the same way in every run (no timing noise);
# a checkpoint every 3 steps; 150 = 4 x 32 + 22 samples per epoch: a short last step. (Loader workers under FSDP2:
# tests/test_user_loop.py.)
OPTIONS = dict(dataset="synthetic", model="resnet8", norm="none", epochs=2, train_samples=150, test_samples=32,
               initial_batch=32, lr=0.1, momentum=0.9, progress=False, balancer="pid", balance_every=1,
               slowdown=(1.0, 3.0), emulated_sample_ms=0.3, skip_emulated_sleep=True,
               checkpoint_every=3, measure_noise=True)
COMPARED = ["step", "rank", "rank_batch", "global_batch", "loss", "lr"]


def train(folder, **overrides):
    result = run(RunConfig(**{**OPTIONS, "out": str(folder), **overrides}))
    return result, torch.load(result.run_dir / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The FSDP2 run, the same on DDP, the FSDP2 run killed at step 8 and resumed on 2 and on 3 ranks."""
    folder = tmp_path_factory.mktemp("fsdp_engine")
    found = {"fsdp": train(folder / "fsdp", world_size=2, gradient_sync="fsdp"),
             "ddp": train(folder / "ddp", world_size=2, gradient_sync="ddp")}
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("DYNBATCH_TEST_HOOKS", "1")
    monkeypatch.setenv("DYNBATCH_FAULT", "kill:1:8")    # epoch 2 (steps 5-9): after the step-6 checkpoint
    with pytest.raises(RunFailed):
        train(folder / "killed", world_size=2, gradient_sync="fsdp")
    monkeypatch.undo()
    # the killed run's folder, copied first: each resume continues it in place
    shutil.copytree(folder / "killed", folder / "killed_onto_3")
    found["resumed"] = train(folder / "killed", world_size=2, gradient_sync="fsdp", resume=str(folder / "killed"))
    found["onto 3"] = train(folder / "killed_onto_3", world_size=3, gradient_sync="fsdp", slowdown=(1.0, 3.0, 1.0),
                            resume=str(folder / "killed_onto_3"))
    return found


def max_difference(a: dict, b: dict) -> float:
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def test_fsdp2_in_the_engine_matches_the_ddp_path_on_a_changing_split(runs):
    (fsdp, fsdp_weights), (ddp, ddp_weights) = runs["fsdp"], runs["ddp"]
    assert fsdp.config["resolved"]["gradient_sync"] == "fsdp"
    assert fsdp.steps.query("rank == 1").rank_batch.nunique() > 2            # the split really changed
    assert fsdp.steps.groupby("step").rank_batch.sum().tolist() == ([32] * 4 + [22]) * 2
    pd.testing.assert_frame_equal(fsdp.steps[["step", "rank", "rank_batch"]], ddp.steps[["step", "rank", "rank_batch"]])
    assert max_difference(fsdp_weights, ddp_weights) <= 1e-5   # DDP's path is exact against one process (test_ddp_path)


def test_fsdp2_measures_the_same_noise_scale_points_as_the_ddp_path(runs):
    fsdp, ddp = runs["fsdp"][0], runs["ddp"][0]
    for column in ("rank_grad_sq", "global_grad_sq"):
        relative = ((fsdp.steps[column] - ddp.steps[column]).abs() / ddp.steps[column].abs()).max()
        assert relative <= 1e-5, column
    for column in ("noise_trace", "noise_gradient_sq"):   # the epoch's estimates from those points
        assert fsdp.epochs[column].notna().all()
        assert ((fsdp.epochs[column] - ddp.epochs[column]).abs() / ddp.epochs[column].abs()).max() <= 1e-5, column


def test_fsdp2_killed_mid_epoch_resumes_bit_exactly_and_continues_on_three_ranks(runs):
    (reference, expected), (resumed, weights) = runs["fsdp"], runs["resumed"]
    assert all(torch.equal(expected[key], weights[key]) for key in expected)
    pd.testing.assert_frame_equal(resumed.steps[COMPARED], reference.steps[COMPARED])
    onto_three, three_weights = runs["onto 3"]
    assert onto_three.steps.groupby("step").rank_batch.sum().tolist() == \
        reference.steps.groupby("step").rank_batch.sum().tolist()            # the same global batches
    assert onto_three.steps.query("step >= 8").world_size.eq(3).all()
    assert max_difference(expected, three_weights) <= 1e-5
