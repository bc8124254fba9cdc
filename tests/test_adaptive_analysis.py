"""The adaptive notebook's analysis on known numbers: the run plan, the critical batch fit, the emulated timeline, the
verdict, and precise batch-norm statistics (what makes a large batch's test accuracy comparable)."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dynbatch_core import RunConfig, scaled_lr
from dynbatch_core.study.adaptive_findings import (batch_changes, describe_verdict, fixed_schedules, goodput_verdict,
                                             measured_race, moving_runs, race_plan, slow_rank_labels)
from dynbatch_core.study.critical_batch import (emulated_timeline, fit_critical_batch, noise_at_target, noise_scale_at,
                                          static_sweep, with_emulated_time)
from dynbatch_core.engine.evaluation import recompute_batch_norm
from dynbatch_core.records import RunResult


def _plan():
    return race_plan([16, 128], {"increasing": 16, "loss-plateau": 64}, goodput_batch=32, lr=0.05,
                     lr_reference_batch=64, decide_every=5, goodput_threshold=0.05)


def test_the_race_plan_names_each_runs_kind_and_gives_every_run_the_lr_the_notebook_gave_it_before():
    plans, kinds = _plan()
    assert kinds == {"static 16": "static", "static 128": "static", "increasing": "class", "loss-plateau": "class",
                     "goodput": "goodput", "goodput adascale": "variant"}
    assert list(plans) == list(kinds) and slow_rank_labels(kinds) == ["static 16", "static 128", "goodput"]
    for label in ("static 16", "static 128", "increasing", "loss-plateau", "goodput"):
        fields = plans[label]
        assert fields["lr_scaling"] == "linear" and fields["lr_reference_batch"] == 64
        # the notebook's old lr_at(B) = lr * B / 64 at the run's first batch, to the bit (power-of-two ratios)
        assert scaled_lr(fields["lr"], fields["initial_batch"], 64, "linear") == 0.05 * fields["initial_batch"] / 64
    adascale = plans["goodput adascale"]   # AdaScale's B_0 is its reference batch: its own initial batch, as before
    assert adascale["lr_scaling"] == "adascale" and adascale["lr_reference_batch"] == adascale["initial_batch"] == 32
    assert adascale["lr"] == 0.05 * 32 / 64
    assert plans["goodput"]["schedule"] == "goodput" and plans["goodput"]["decide_every"] == 5
    for fields in plans.values():
        RunConfig.from_dict(fields)   # every key is a RunConfig field


def _result(batches, steps=None):
    epochs = pd.DataFrame({"epoch": range(len(batches)), "global_batch": batches})
    return RunResult(Path("unused"), {}, steps if steps is not None else pd.DataFrame(), epochs)


def test_the_runs_whose_b_moves_come_goodput_first_and_the_fixed_schedules_are_what_the_parameters_imply():
    plans, kinds = _plan()
    runs = {label: _result([16, 32]) for label in plans}
    slow = {"static 16": _result([16]), "goodput": _result([32])}
    moving = moving_runs(runs, kinds, slow_runs=slow, slowdown=[1, 3])
    assert list(moving) == ["goodput", "goodput adascale", "increasing", "loss-plateau", "goodput, slowdown [1, 3]"]
    assert moving["goodput, slowdown [1, 3]"] is slow["goodput"]
    assert list(fixed_schedules(runs, kinds)) == ["static 16", "static 128", "increasing"]  # not loss-plateau


def test_the_measured_race_is_one_seeds_runs_with_goodputs_run_swapped_for_the_cpu_one(monkeypatch):
    plans, kinds = _plan()
    results = {(label, seed): _result([16]) for seed in (0, 1) for label in plans}
    cpu = _result([32])
    seen = {}
    monkeypatch.setattr("dynbatch_core.study.adaptive_findings.race_table",
                        lambda runs, kinds, target: seen.update(runs=runs, target=target))
    measured_race(results, cpu, kinds, seed=1, target=0.5)
    assert list(seen["runs"]) == [(label, 1) for label in plans] and seen["target"] == 0.5
    assert seen["runs"]["goodput", 1] is cpu and seen["runs"]["goodput adascale", 1] is results["goodput adascale", 1]


def test_the_sweep_takes_each_static_batchs_median_over_seeds_and_the_noise_scale_the_median_at_the_target():
    race = pd.DataFrame({"run": ["static 16", "static 16", "static 64", "static 64", "goodput"],
                         "kind": ["static", "static", "static", "static", "goodput"], "seed": [0, 1, 0, 1, 0],
                         "batch": [16, 16, 64, 64, 32], "samples": [100.0, 300.0, 50.0, math.nan, 10.0]})
    sweep = static_sweep(race)
    assert sweep["batch"].tolist() == [16, 64] and sweep["samples"].tolist() == [200.0, 50.0]
    epochs = pd.DataFrame({"samples": [100, 100, 100], "noise_scale": [10.0, 20.0, 40.0]})  # 100, 200, 300 seen
    results = {("static 16", 0): _result([16, 16, 16]), ("static 16", 1): _result([16, 16, 16]),
               ("static 64", 0): _result([64, 64, 64]), ("static 64", 1): _result([64, 64, 64])}
    for result in results.values():
        result.epochs = epochs
    # reached at 100 (epoch 0: 10), 300 (epoch 2: 40), 50 (epoch 0: 10); never (NaN) is left out; goodput is no static
    assert noise_at_target(race, results) == 10.0
    assert math.isnan(noise_at_target(race[race["kind"] == "goodput"], results))


def test_the_fit_recovers_a_known_critical_batch_from_mccandlish_steps():
    batches = [16, 32, 64, 128, 256, 512]
    samples = [b * 100 * (1 + 200 / b) for b in batches]   # S_min = 100 steps, B_crit = 200
    fit = fit_critical_batch(batches, samples)
    assert fit.critical_batch == pytest.approx(200, rel=1e-9) and fit.min_steps == pytest.approx(100, rel=1e-9)
    assert fit.min_samples == pytest.approx(20000, rel=1e-9) and fit.steps_at(50) == pytest.approx(500)
    assert fit.steps_at(np.array([50.0, 200.0])) == pytest.approx([500, 200])   # the figure's curve, per B


def test_batches_that_never_reached_the_target_are_left_out_and_too_few_give_nan():
    fit = fit_critical_batch([16, 64, 512], [16 * 60 * (1 + 40 / 16), 64 * 60 * (1 + 40 / 64), math.nan])
    assert fit.batches == (16, 64) and fit.critical_batch == pytest.approx(40)
    assert math.isnan(fit_critical_batch([16, 512], [1000.0, math.nan]).critical_batch)


def test_steps_that_keep_halving_with_b_give_no_critical_batch_rather_than_a_clamped_one():
    # E the same at every B: S = E / B falls without bound, so S_min = 0 and B_crit is undefined
    assert math.isnan(fit_critical_batch([16, 64, 256], [8000.0, 8000.0, 8000.0]).critical_batch)


def _steps(rows):
    return pd.DataFrame(rows, columns=["epoch", "step", "rank", "global_batch", "compute_s"])


def test_the_emulated_timeline_adds_the_slowest_rank_of_every_step():
    steps = _steps([(0, 0, 0, 16, 0.02), (0, 0, 1, 16, 0.05), (0, 1, 0, 32, 0.04), (0, 1, 1, 32, 0.03),
                    (1, 2, 0, 32, 0.01), (1, 2, 1, 32, 0.02)])
    timeline = emulated_timeline(steps)
    assert timeline["emulated_s"].tolist() == pytest.approx([0.05, 0.09, 0.11])
    assert timeline["global_batch"].tolist() == [16, 32, 32]
    epochs = pd.DataFrame({"epoch": [0, 1], "samples": [48, 32], "noise_scale": [10.0, 30.0]})
    assert with_emulated_time(epochs, steps)["emulated_s"].tolist() == pytest.approx([0.09, 0.11])
    assert noise_scale_at(epochs, 60) == 30.0 and noise_scale_at(epochs, 40) == 10.0
    assert batch_changes(steps) == [(0, 16), (1, 32)]


def _race(goodput, statics, classes):
    rows = [{"run": "goodput", "kind": "goodput", "seed": s, "emulated_s": t} for s, t in enumerate(goodput)]
    for name, times in {**statics, **classes}.items():
        kind = "static" if name in statics else "class"
        rows += [{"run": name, "kind": kind, "seed": s, "emulated_s": t} for s, t in enumerate(times)]
    return pd.DataFrame(rows)


def test_the_verdict_judges_each_check_per_seed_and_calls_a_band_that_straddles_the_bound_within_noise():
    statics = {"static 16": [9, 10, 11], "static 64": [5, 4, 6], "static 256": [7, 8, math.nan]}
    classes = {"increasing": [6, 6, 7]}
    verdict = goodput_verdict(_race([5.3, 4.3, 6.2], statics, classes))   # 1.06, 1.075, 1.03 x static 64
    assert verdict["best_static"] == "static 64" and verdict["ratio_to_best_static"] == pytest.approx(5.3 / 5)
    assert verdict["median_static_s"] == 8 and verdict["outcome"] == "passes" and verdict["passed"]
    assert verdict["bands"]["best_static"]["low"] == pytest.approx(6.2 / 6)
    slower = goodput_verdict(_race([5.6, 4.5, 6.7], statics, classes))     # every seed above 1.1
    assert slower["within_tolerance_of_best_static"] == "fail" and slower["outcome"] == "fails"
    noisy = goodput_verdict(_race([5.3, 4.5, 6.2], statics, classes))      # 1.06, 1.125, 1.03: the band holds 1.1
    assert noisy["within_tolerance_of_best_static"] == "within noise" and noisy["outcome"] == "within noise"
    assert not noisy["passed"] and "within the seeds' noise" in describe_verdict(noisy)
    beaten = goodput_verdict(_race([5.3, 4.3, 6.2], statics, {"increasing": [5, 4, 6]}))
    assert beaten["faster_than_every_class_schedule"] == "fail" and not beaten["passed"]
    never = goodput_verdict(_race([math.nan] * 3, statics, {}))
    assert never["goodput_s"] == math.inf and never["outcome"] == "fails"
    one_seed = goodput_verdict(_race([5.3], {name: t[:1] for name, t in statics.items()}, {"increasing": [6]}))
    assert one_seed["outcome"] == "passes" and "no noise band" in describe_verdict(one_seed)   # 1.06 x static 64


class _Images:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitems__(self, indices):
        return self.images[indices], torch.zeros(len(indices), dtype=torch.long)


def test_precise_batch_norm_sets_the_running_mean_to_the_mean_over_the_samples_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    images = torch.randn(300, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, -1.0, 0.5])
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
    model(torch.randn(8, 3))   # stale statistics from elsewhere
    state = torch.random.get_rng_state()
    recompute_batch_norm(model, _Images(images), samples=250, rank=0, world_size=1, device=torch.device("cpu"),
                         batch_size=64)   # 64, 64, 64, 58: unequal batches, each weighted by its size
    norm = model[0]
    assert torch.allclose(norm.running_mean, images[:250].mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, images[:250].var(0), rtol=0.05)
    assert norm.momentum == 0.1 and torch.equal(torch.random.get_rng_state(), state)
