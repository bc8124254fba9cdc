"""Global batch schedules on hand-made epoch histories: exact sequences, clamping, state round trips."""
import dataclasses
import io

import pytest
import torch

from dynbatch_core.config import RunConfig
from dynbatch_core.batching.schedules import SCHEDULES, EpochSummary, build_schedule, plateau_progress


def history_of(batches, losses, seconds):
    return [EpochSummary(epoch, batch, loss, epoch_s)
            for epoch, (batch, loss, epoch_s) in enumerate(zip(batches, losses, seconds))]


def decide_next(schedule, batches, losses, seconds=None):
    history = history_of(batches, losses, seconds or [10.0] * len(batches))
    return schedule.decide(len(history), history).global_batch


def run_epochs(schedule, epochs, losses=None, seconds=None):
    """Decide, 'train' one epoch with the given loss and time, repeat; returns every decision."""
    history, decisions = [], []
    for epoch in range(epochs):
        decision = schedule.decide(epoch, history)
        decisions.append(decision)
        history.append(EpochSummary(epoch, decision.global_batch, losses[epoch] if losses else 1.0,
                                    seconds[epoch] if seconds else 10.0))
    return decisions


def batches_of(schedule, epochs):
    return [decision.global_batch for decision in run_epochs(schedule, epochs)]


# --- increasing / decreasing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("every, expected", [(1, [16, 32, 64, 100, 100]), (2, [16, 16, 32, 32, 64, 64, 100, 100])])
def test_increasing_doubles_every_n_epochs_up_to_max_batch(every, expected):
    schedule = build_schedule("increasing", initial_batch=16, min_batch=2, max_batch=100, every=every)
    assert batches_of(schedule, len(expected)) == expected


@pytest.mark.parametrize("every, expected", [(1, [100, 50, 25, 12, 8, 8]), (2, [100, 100, 50, 50, 25, 25, 12, 12, 8])])
def test_decreasing_halves_every_n_epochs_down_to_min_batch(every, expected):
    schedule = build_schedule("decreasing", initial_batch=100, min_batch=8, max_batch=None, every=every)
    assert batches_of(schedule, len(expected)) == expected


def test_static_keeps_the_initial_batch():
    assert batches_of(build_schedule("static", initial_batch=48, min_batch=2), 3) == [48, 48, 48]


# --- loss-plateau -------------------------------------------------------------------------------------------------

def test_plateau_progress_is_zero_on_a_flat_loss_and_50_at_a_5_percent_mean_excess():
    assert plateau_progress([1.0, 1.0, 1.0]) == 0.0
    assert plateau_progress([1.1, 1.0]) == pytest.approx(50.0)
    assert plateau_progress([1.0, 0.5]) == pytest.approx(500.0)


def test_loss_plateau_doubles_on_a_flat_loss_and_halves_on_a_falling_one():
    schedule = build_schedule("loss-plateau", initial_batch=64, min_batch=2, max_batch=1024, plateau_window=2,
                              plateau_threshold=50.0)
    assert decide_next(schedule, [64, 64, 64], [1.0, 1.0, 1.0]) == 128
    assert decide_next(schedule, [64, 64, 64], [2.0, 1.0, 0.5]) == 32     # P_2 = 500
    assert decide_next(schedule, [64, 64, 64], [2.0, 1.04, 1.0]) == 128   # P_2 = 20: plateaued
    assert decide_next(schedule, [64, 1024, 1024], [1.0, 1.0, 1.0]) == 1024  # clamped


def test_loss_plateau_keeps_b_until_the_window_is_full():
    schedule = build_schedule("loss-plateau", initial_batch=64, min_batch=2, plateau_window=3)
    assert schedule.decide(0, []).global_batch == 64
    assert decide_next(schedule, [64], [1.0]) == 64
    assert decide_next(schedule, [64, 64], [1.0, 1.0]) == 64
    assert decide_next(schedule, [64, 64, 64], [1.0, 1.0, 1.0]) == 128


def test_loss_plateau_doubles_when_an_epoch_exceeds_the_time_budget():
    schedule = build_schedule("loss-plateau", initial_batch=64, min_batch=2, plateau_window=2, time_budget_s=30.0)
    assert decide_next(schedule, [64, 64, 64], [2.0, 1.0, 0.5], [20.0, 20.0, 31.0]) == 128
    assert decide_next(schedule, [64, 64, 64], [2.0, 1.0, 0.5], [40.0, 40.0, 29.0]) == 32
    assert decide_next(schedule, [64], [2.0], [31.0]) == 128  # the budget applies before the window is full


# --- score --------------------------------------------------------------------------------------------------------

@pytest.fixture
def score():
    return build_schedule("score", initial_batch=64, min_batch=2, max_batch=1024, score_tolerance=0.02)


def test_score_first_move_doubles(score):
    assert score.decide(0, []).global_batch == 64
    assert decide_next(score, [64], [1.0]) == 128


def test_score_repeats_a_change_that_improved_it_and_reverses_one_that_made_it_worse(score):
    # S = 0.8 L/L_0 + 0.2 t/t_0
    assert decide_next(score, [64, 128], [1.0, 0.9], [10.0, 8.0]) == 256   # S 1 -> 0.88: doubling helped
    assert decide_next(score, [64, 128], [1.0, 1.0], [10.0, 14.0]) == 64   # S 1 -> 1.08: doubling hurt
    assert decide_next(score, [64, 32], [1.0, 0.9], [10.0, 10.0]) == 16    # S 1 -> 0.92: halving helped
    assert decide_next(score, [64, 32], [1.0, 1.1], [10.0, 10.0]) == 64    # S 1 -> 1.08: halving hurt


def test_score_keeps_b_within_the_tolerance_and_remembers_the_last_change(score):
    assert decide_next(score, [64, 128], [1.0, 0.99], [10.0, 10.0]) == 128         # S 1 -> 0.992: -0.8 %
    assert decide_next(score, [64, 128, 128], [1.0, 0.99, 0.9], [10.0] * 3) == 256   # last change: doubling
    assert decide_next(score, [64, 128, 64, 64], [1.0, 0.9, 0.89, 0.8], [10.0] * 4) == 32  # last: halving


# --- probe --------------------------------------------------------------------------------------------------------

def test_probe_visits_each_size_once_in_order_clamped():
    schedule = build_schedule("probe", initial_batch=64, min_batch=2, max_batch=100, probe_sizes=(16, 32, 64, 128))
    assert [schedule.decide(epoch, []).global_batch for epoch in range(4)] == [16, 32, 64, 100]


def test_probe_keeps_the_size_with_the_fastest_log_loss_decrease_per_second():
    schedule = build_schedule("probe", initial_batch=64, min_batch=2, probe_sizes=(16, 32, 64, 128))
    losses, seconds = [1.0, 0.8, 0.6, 0.55], [40.0, 20.0, 10.0, 6.0]
    # -d ln L per epoch: 0.223, 0.255, 0.187, 0.087 -> per second: 0.0056, 0.0128, 0.0187, 0.0145
    decisions = run_epochs(schedule, 8, losses + [0.5] * 4, seconds + [1.0] * 4)
    assert [d.global_batch for d in decisions] == [16, 32, 64, 128, 64, 64, 64, 64]
    # a loss that falls fast and then flattens, epochs of similar length: the early probe wins
    decisions = run_epochs(schedule, 5, [1.0, 0.5, 0.45, 0.44, 0.4], [10.0, 9.0, 8.0, 7.0, 7.0])
    assert decisions[-1].global_batch == 16


# --- smith --------------------------------------------------------------------------------------------------------

def test_smith_multiplies_b_at_the_milestones_then_decays_the_lr_at_max_batch():
    schedule = build_schedule("smith", initial_batch=64, min_batch=2, max_batch=256, smith_epochs=(2, 4, 6, 8),
                              smith_factor=2.0)
    decisions = run_epochs(schedule, 10)
    assert [d.global_batch for d in decisions] == [64, 64, 128, 128, 256, 256, 256, 256, 256, 256]
    assert [d.lr_factor for d in decisions] == [1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]


def test_smith_splits_a_milestone_between_b_and_the_lr_when_max_batch_cuts_it():
    schedule = build_schedule("smith", initial_batch=64, min_batch=2, max_batch=200, smith_epochs=(1, 2),
                              smith_factor=2.0)
    decisions = run_epochs(schedule, 3)
    assert [(d.global_batch, d.lr_factor) for d in decisions] == [(64, 1.0), (128, 1.0), (200, 200 / 256)]


def test_smith_rounds_b_for_a_fractional_factor():
    schedule = build_schedule("smith", initial_batch=10, min_batch=2, smith_epochs=(1, 2), smith_factor=1.5)
    assert batches_of(schedule, 3) == [10, 15, 23]  # 22.5 rounds half up


def test_smith_refuses_a_factor_of_one_or_less():
    with pytest.raises(ValueError, match="smith_factor must be > 1"):
        build_schedule("smith", initial_batch=64, smith_factor=1.0)


# --- every schedule -----------------------------------------------------------------------------------------------

def config_options(**overrides):
    config = dataclasses.replace(RunConfig(), **overrides)
    names = ("every", "plateau_window", "plateau_threshold", "time_budget_s", "score_tolerance", "probe_sizes",
             "smith_epochs", "smith_factor")
    return {"initial_batch": config.initial_batch, "min_batch": 2, "max_batch": 512,
            **{name: getattr(config, name) for name in names}}


def saved_and_loaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_restored_schedule_decides_like_the_original(name):
    original = build_schedule(name, **config_options(smith_epochs=(1, 3)))
    restored = build_schedule(name, **config_options(smith_epochs=[1, 3]))  # a list equals the tuple
    restored.load_state_dict(saved_and_loaded(original.state_dict()))
    losses, seconds = [2.0, 1.5, 1.4, 1.39, 1.39, 1.2, 1.0, 1.0], [30.0, 20.0, 15.0, 14.0, 9.0, 9.0, 8.0, 8.0]
    expected = run_epochs(original, 8, losses, seconds)
    assert run_epochs(restored, 8, losses, seconds) == expected
    assert all(2 <= d.global_batch <= 512 for d in expected)


# another value for every decision option; each differs from config_options()'s
OTHER_OPTION_VALUES = {"initial_batch": 32, "min_batch": 4, "max_batch": 256, "every": 2, "plateau_window": 3,
                       "plateau_threshold": 20.0, "time_budget_s": 60.0, "score_tolerance": 0.05,
                       "probe_sizes": (16, 64), "smith_epochs": (2,), "smith_factor": 3.0, "decide_every": 7,
                       "goodput_threshold": 0.1}


@pytest.mark.parametrize("name, option", [(name, option) for name, cls in SCHEDULES.items()
                                          for option in ("initial_batch", "min_batch", "max_batch", *cls.options)])
def test_state_saved_with_other_options_is_refused_naming_the_option(name, option):
    saved = build_schedule(name, **config_options(smith_epochs=(1, 3))).state_dict()
    changed = build_schedule(name, **{**config_options(smith_epochs=(1, 3)), option: OTHER_OPTION_VALUES[option]})
    with pytest.raises(ValueError, match=f"schedule state has {option}="):
        changed.load_state_dict(saved_and_loaded(saved))


def test_state_holds_the_name_and_the_options_as_plain_lists():
    schedule = build_schedule("probe", initial_batch=64, min_batch=2, max_batch=512, probe_sizes=(16, 32, 64))
    assert saved_and_loaded(schedule.state_dict()) == {
        "schedule": "probe", "options": {"initial_batch": 64, "min_batch": 2, "max_batch": 512,
                                         "probe_sizes": [16, 32, 64]}}
    fewer_probes = build_schedule("probe", initial_batch=64, min_batch=2, max_batch=512, probe_sizes=[16, 32])
    with pytest.raises(ValueError, match=r"probe_sizes=\[16, 32, 64\], this probe schedule has probe_sizes=\[16, 32\]"):
        fewer_probes.load_state_dict(schedule.state_dict())


def test_state_saved_before_options_were_recorded_is_accepted():
    schedule = build_schedule("loss-plateau", initial_batch=64, min_batch=2, plateau_window=3)
    schedule.load_state_dict({"schedule": "loss-plateau"})
    assert decide_next(schedule, [64, 64, 64], [1.0, 1.0, 1.0]) == 128


def test_state_of_another_schedule_is_refused():
    with pytest.raises(ValueError, match="'probe'"):
        build_schedule("score", initial_batch=64).load_state_dict(build_schedule("probe", initial_batch=64)
                                                                  .state_dict())


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(ValueError, match="choose from static, increasing, decreasing, loss-plateau, score, probe, "
                                         "smith"):
        build_schedule("sometimes", initial_batch=64)
