"""The training loop's numbers at one rank, run inside the test process (a gloo group of one: no process to start):
the LR warm-up, AdaScale's budget and gain, the noise scale past an overflowed step, goodput with loader workers."""
import dataclasses
import datetime
import json
import math

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from dynbatch_core import RunConfig
from dynbatch_core.config import RENAMED_FIELDS, stored_config
from dynbatch_core.engine.elastic import newest_checkpoint
from dynbatch_core.batching.goodput import EXPLORE_STEPS
from dynbatch_core.batching.lr import decay_factor
from dynbatch_core.engine.train import RankTrainer


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("group") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def fit(tmp_path, name, before=None, **options) -> tuple[RankTrainer, pd.DataFrame, pd.DataFrame]:
    """One run in this process; `before(trainer)` may instrument it first."""
    values = dict(dataset="synthetic", model="resnet8", norm="none", world_size=1, test_samples=32, progress=False,
                  checkpoints=False, threads=1, lr=0.05, out=str(tmp_path / name))
    (tmp_path / name).mkdir()
    config = RunConfig(**{**values, **options})
    trainer = RankTrainer(config, rank=0, device=torch.device("cpu"), run_dir=tmp_path / name, draw_progress=False)
    if before is not None:
        before(trainer)
    trainer.fit()
    return trainer, pd.read_csv(tmp_path / name / "steps.csv"), pd.read_csv(tmp_path / name / "epochs.csv")


def test_no_warm_up_at_an_epoch_start_when_only_the_last_step_was_short(one_rank_group, tmp_path):
    # 520 = 10 x 48 + 40: the short last step's LR (linear scaling: 40/48 of it) used to start a ramp every epoch
    _, steps, _ = fit(tmp_path, "warmup", epochs=3, train_samples=520, initial_batch=48, lr_scaling="linear",
                      lr_decay="none", warmup_steps=4)
    for epoch, part in steps.groupby("epoch"):
        assert part.lr.tolist() == pytest.approx([0.05] * 10 + [0.05 * 40 / 48]), epoch


def test_warm_up_ramps_over_its_steps_when_the_batch_grows(one_rank_group, tmp_path):
    _, steps, _ = fit(tmp_path, "increasing", epochs=2, train_samples=256, initial_batch=16, schedule="increasing",
                      lr_scaling="linear", lr_decay="none", warmup_steps=4)
    second = steps[steps.epoch == 1].lr.tolist()   # B 16 -> 32: the target LR doubles from 0.05 to 0.1
    assert second[:5] == pytest.approx([0.0625, 0.075, 0.0875, 0.1, 0.1])


def test_adascale_runs_until_its_budget_is_spent_and_its_cosine_decay_ends(one_rank_group, tmp_path):
    """B grows past B_0 with a gain below B/B_0, so the budget (3 epochs of samples at B_0) takes more than 3 real
    epochs; the run used to stop after 3 with the LR still high."""
    trainer, steps, epochs = fit(tmp_path, "adascale", epochs=3, train_samples=256, initial_batch=16,
                                 schedule="increasing", max_batch=64, lr_scaling="adascale", lr_decay="cosine")
    budget = 3 * 256
    progress = trainer.progress
    assert progress.scaled_samples >= budget and progress.samples_seen > budget   # more real samples than --epochs
    assert len(epochs) > 3
    assert decay_factor("cosine", progress.scaled_samples, budget) <= 0.01
    # the last step's LR: its gain times the cosine factor at the progress before it, near the end of the decay
    assert steps.lr.iloc[-1] < 0.05 * 0.05


def test_adascale_gain_never_drops_to_one_when_noise_dominates(one_rank_group, tmp_path):
    """At B = 4 B_0 the smoothed |G|^2 of this tiny run hovers about 0 (noise dominates): the gain there is the
    limit B/B_0 = 4. It used to fall to 1 whenever the estimate crossed zero: [3.89, 3.95, 3.99, 1.0, 3.99, 1.0, ...],
    the LR jumping 4x back and forth within one epoch."""
    gains = []

    def instrument(trainer):
        step_lr = trainer.step_lr

        def logged(batch, lr_factor):
            lr, gain = step_lr(batch, lr_factor)
            gains.append((batch, gain))
            return lr, gain
        trainer.step_lr = logged

    fit(tmp_path, "gain", before=instrument, epochs=3, train_samples=512, initial_batch=16, schedule="increasing",
        lr_scaling="adascale", lr_decay="cosine")
    at_64 = [gain for batch, gain in gains if batch == 64]
    assert len(at_64) == 8 and min(at_64) > 3.5, at_64


def test_one_overflowed_step_leaves_the_noise_scale_finite_and_counts_as_missing(one_rank_group, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("DYNBATCH_TEST_HOOKS", "1")
    monkeypatch.setenv("DYNBATCH_FAULT", "nonfinite:0:2")   # step 2 reports inf norms, as an fp16 overflow does
    trainer, steps, epochs = fit(tmp_path, "overflow", epochs=3, train_samples=512, initial_batch=128, lr=0.0,
                                 measure_noise=True)
    monkeypatch.delenv("DYNBATCH_FAULT")
    _, clean_steps, clean = fit(tmp_path, "clean", epochs=3, train_samples=512, initial_batch=128, lr=0.0,
                                measure_noise=True)
    assert epochs.noise_scale.map(math.isfinite).all(), epochs.noise_scale.tolist()
    assert epochs.noise_missing.tolist() == [clean.noise_missing[0] + 1, *clean.noise_missing[1:]]
    assert math.isfinite(trainer.noise_smoother.noise_scale)
    # lr 0: both runs see the same gradients, so every epoch but the first agrees exactly
    assert epochs.noise_scale[1:].tolist() == clean.noise_scale[1:].tolist()


def test_goodput_with_loader_workers_decides_after_its_explore_steps_at_the_tried_batch(one_rank_group, tmp_path):
    """With 2 workers a new B is trained 4 steps after the decision (the loader has the next 4 planned): the rule
    counts its explore steps from there. It used to decide again before any step at the tried B had run."""
    seen_at_tried = []   # at each decision after an exploration: steps the rule had observed at the tried B

    def instrument(trainer):
        rule, decide, tried = trainer.schedule.rule, trainer.schedule.rule.decide, []

        def logged(current):
            if tried:
                seen_at_tried.append(len(rule.times.get(tried.pop(), [])))
            batch, wait = decide(current)
            if wait == EXPLORE_STEPS:
                tried.append(batch)
            return batch, wait
        rule.decide = logged

    fit(tmp_path, "goodput", before=instrument, epochs=1, train_samples=2048, initial_batch=16, schedule="goodput",
        decide_every=6, measure_noise=True, loader_workers=2, emulated_sample_ms=1.0, emulated_step_ms=40.0,
        skip_emulated_sleep=True)
    assert seen_at_tried and all(count >= EXPLORE_STEPS for count in seen_at_tried), seen_at_tried


def test_starting_an_epochs_loader_draws_nothing_from_the_default_generator(one_rank_group, tmp_path):
    """iter(DataLoader) draws its workers' base seed from the loader's generator when it has one, else from the
    default one: a resumed run restored the default generator's state from after that draw and then drew again, one
    step ahead of the uninterrupted run for any model or dataset that uses it (dropout)."""
    (tmp_path / "rng").mkdir()
    config = RunConfig(dataset="synthetic", model="resnet8", world_size=1, train_samples=64, test_samples=32,
                       progress=False, checkpoints=False, threads=1, loader_workers=1, out=str(tmp_path / "rng"))
    trainer = RankTrainer(config, rank=0, device=torch.device("cpu"), run_dir=tmp_path / "rng", draw_progress=False)
    before = torch.get_rng_state()
    trainer.sampler.set_epoch(0)
    trainer.sampler.plan_step(0, [64])
    trainer.sampler.plan_step(1, [64])
    trainer.sampler.plan_step(2, [64])
    batches = iter(trainer.loader)
    assert torch.equal(before, torch.get_rng_state())
    del batches


def _as_written_before_the_renames(run_dir):
    """Turn a run folder into what runs wrote before initial_batch, measure_noise and skip_emulated_sleep had those
    names and before lr_reference_batch existed, and before the goodput rule read the trainer's noise smoother
    (its checkpoints held a second copy)."""
    old_names = {new: old for old, new in RENAMED_FIELDS.items()}

    def old_config(values):
        return {old_names.get(name, name): value for name, value in values.items() if name != "lr_reference_batch"}
    config_file = run_dir / "config.json"
    config_file.write_text(json.dumps(old_config(json.loads(config_file.read_text()))))
    for state_file in (run_dir / "checkpoints").glob("step-*/state.pt"):
        state = torch.load(state_file, weights_only=True)
        state["config"] = old_config(state["config"])
        state["schedule"]["rule"]["smoother"] = state["noise_smoother"]
        torch.save(state, state_file)
    assert "batch_size" in json.loads(config_file.read_text())


def test_a_run_folder_written_before_the_renames_resumes_to_the_uninterrupted_runs_weights(one_rank_group, tmp_path):
    options = dict(epochs=2, train_samples=96, initial_batch=16, schedule="goodput", decide_every=3, lr_decay="none",
                   measure_noise=True, emulated_sample_ms=1.0, emulated_step_ms=20.0, skip_emulated_sleep=True,
                   checkpoints=True)
    whole, whole_steps, _ = fit(tmp_path, "whole", **options)
    first, _, _ = fit(tmp_path, "old", **{**options, "epochs": 1})
    (tmp_path / "old" / "config.json").write_text(json.dumps(first.config.to_dict()))   # as the launcher writes it
    _as_written_before_the_renames(tmp_path / "old")
    config = dataclasses.replace(stored_config(tmp_path / "old"), epochs=2, resume=str(tmp_path / "old"))
    assert (config.initial_batch, config.measure_noise, config.skip_emulated_sleep) == (16, True, True)
    resumed = RankTrainer(config, rank=0, device=torch.device("cpu"), run_dir=tmp_path / "old", draw_progress=False)
    resumed.resume(newest_checkpoint(tmp_path / "old"))
    resumed.fit()
    assert whole_steps.global_batch.nunique() > 1   # goodput moved B: its state and the smoother carried over
    assert resumed.schedule.rule.smoother is resumed.noise_smoother   # one smoothed noise scale, not two
    assert pd.read_csv(tmp_path / "old" / "steps.csv").global_batch.tolist() == whole_steps.global_batch.tolist()
    for name, tensor in whole.module.state_dict().items():
        assert torch.equal(tensor, resumed.module.state_dict()[name]), name
