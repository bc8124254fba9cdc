"""analysis.py on small hand-made steps/epochs tables with numbers worked out by hand."""
import math

import pandas as pd
import pytest

from dynbatch_core.study.analysis import (balance_efficiency, balancer_table, ceiling_speedup, efficiency_table,
                                    ideal_split, of_seed, oscillation, priced_time, runnable_ranks, seed_band,
                                    seeded_race, settle_step, slowdown_segments, slowdown_sweep, speedup_table,
                                    step_times, steady_throughput, tag_runs, time_to_reach)
from dynbatch_core.study.findings import describe_band


def steps_table(rows):
    """rows: (step, rank, rank_batch, compute_s, wait_s); global_batch is the step's sum of rank_batch."""
    table = pd.DataFrame(rows, columns=["step", "rank", "rank_batch", "compute_s", "wait_s"])
    table["global_batch"] = table.groupby("step")["rank_batch"].transform("sum")
    return table


# two ranks, global batch 8, ideal split [6, 2] (slowdowns [1, 3])
SPLIT_STEPS = steps_table([
    (0, 0, 4, 0.10, 0.20), (0, 1, 4, 0.30, 0.00),
    (1, 0, 5, 0.20, 0.10), (1, 1, 3, 0.30, 0.00),
    (2, 0, 6, 0.20, 0.00), (2, 1, 2, 0.20, 0.00),
    (3, 0, 5, 0.20, 0.00), (3, 1, 3, 0.25, 0.00),
    (4, 0, 6, 0.30, 0.00), (4, 1, 2, 0.20, 0.10),
    (5, 0, 6, 0.20, 0.00), (5, 1, 2, 0.20, 0.00),
])


def test_balance_efficiency_is_sum_over_n_times_max_per_step():
    table = balance_efficiency(SPLIT_STEPS)
    assert list(table.columns) == ["step", "efficiency"]
    assert table["step"].tolist() == [0, 1, 2, 3, 4, 5]
    # (0.1 + 0.3) / (2 * 0.3), (0.2 + 0.3) / 0.6, 1, 0.45 / 0.5, 0.5 / 0.6, 1
    assert table["efficiency"].tolist() == pytest.approx([2 / 3, 5 / 6, 1.0, 0.9, 5 / 6, 1.0])


def test_balance_efficiency_of_four_ranks_and_an_idle_step():
    table = balance_efficiency(steps_table([
        (0, 0, 1, 0.1, 0), (0, 1, 1, 0.1, 0), (0, 2, 1, 0.2, 0), (0, 3, 1, 0.4, 0),
        (1, 0, 0, 0.0, 0), (1, 1, 0, 0.0, 0), (1, 2, 0, 0.0, 0), (1, 3, 0, 0.0, 0),
    ]))
    assert table["efficiency"].iloc[0] == pytest.approx(0.8 / 1.6)
    assert math.isnan(table["efficiency"].iloc[1])


def test_ideal_split_is_proportional_to_speed():
    assert ideal_split(128, [1, 3]) == pytest.approx([96.0, 32.0])
    assert ideal_split(132, [1, 1, 2, 4]) == pytest.approx([48.0, 48.0, 24.0, 12.0])
    assert ideal_split(64, [1, 1]) == [32.0, 32.0]
    with pytest.raises(ValueError, match="positive"):
        ideal_split(64, [1, 0])


def test_ceiling_is_mean_speed_over_slowest_speed():
    assert ceiling_speedup([1, 3]) == pytest.approx(2.0)
    assert ceiling_speedup([1, 1, 2, 4]) == pytest.approx(2.75)
    assert ceiling_speedup([1, 8]) == pytest.approx(4.5)
    assert ceiling_speedup([2, 2]) == pytest.approx(1.0)


def test_settle_step_is_first_step_after_which_every_rank_stays_in_the_band():
    # band = 0.05 * 8 / 2 = 0.2 samples: only exactly [6, 2] is inside; step 3 ([5, 3]) leaves it again
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[6, 2]) == 4
    # band = 0.25 * 4 = 1 sample: [5, 3] is inside from step 1 on
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[6, 2], tolerance=0.25) == 1
    # the window ends before step 3: settled from step 2
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[6, 2], end_step=3) == 2
    # a change at step 3 with an already-settled split (within 1 sample) settles at once
    assert settle_step(SPLIT_STEPS, change_step=3, ideal=[6, 2], tolerance=0.25) == 3


def test_settle_step_with_hold_is_the_first_run_of_that_many_settled_steps():
    # in the band (only [6, 2]) at steps 2, 4, 5: step 3 breaks the first run
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[6, 2], hold=1) == 2
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[6, 2], hold=2) == 4
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[6, 2], hold=3) is None
    # a run left again still counts: [5, 3] is in its 0.2-sample band at steps 1 and 3 only
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[5, 3], hold=1) == 1
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[5, 3]) is None
    with pytest.raises(ValueError, match="hold must be at least 1"):
        settle_step(SPLIT_STEPS, change_step=0, ideal=[6, 2], hold=0)


def test_settle_step_is_none_when_the_window_ends_unsettled_or_is_empty():
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[6, 2], end_step=4) is None
    assert settle_step(SPLIT_STEPS, change_step=0, ideal=[4, 4]) is None
    assert settle_step(SPLIT_STEPS, change_step=10, ideal=[6, 2]) is None
    with pytest.raises(ValueError, match="3 entries but the steps hold 2 ranks"):
        settle_step(SPLIT_STEPS, change_step=0, ideal=[4, 2, 2])


def test_oscillation_is_largest_range_over_mean_of_any_rank():
    # steps 2..5: rank 0 holds 6,5,6,6 -> 1 / 5.75; rank 1 holds 2,3,2,2 -> 1 / 2.25
    assert oscillation(SPLIT_STEPS, after_step=2) == pytest.approx(1 / 2.25)
    assert oscillation(SPLIT_STEPS, after_step=4) == 0.0
    assert oscillation(SPLIT_STEPS, after_step=0, end_step=2) == pytest.approx(1 / 3.5)
    assert math.isnan(oscillation(SPLIT_STEPS, after_step=6))


def test_step_time_is_slowest_compute_plus_wait():
    assert step_times(SPLIT_STEPS).tolist() == pytest.approx([0.3, 0.3, 0.2, 0.25, 0.3, 0.2])


def test_steady_throughput_is_samples_over_summed_step_times():
    assert steady_throughput(SPLIT_STEPS) == pytest.approx(48 / 1.55)
    assert steady_throughput(SPLIT_STEPS, after_step=4) == pytest.approx(16 / 0.5)
    assert steady_throughput(SPLIT_STEPS, after_step=1, end_step=3) == pytest.approx(16 / 0.5)
    assert math.isnan(steady_throughput(SPLIT_STEPS, after_step=9))


def test_runnable_ranks_counts_compute_without_the_emulated_sleep():
    table = steps_table([(0, 0, 6, 0.2, 0.1), (0, 1, 2, 0.3, 0.0),
                         (1, 0, 6, 0.2, 0.0), (1, 1, 2, 0.15, 0.05)])
    table["slowdown"] = [1.0, 3.0, 1.0, 3.0]
    # busy seconds 0.2 + 0.1 and 0.2 + 0.05; step times 0.3 and 0.2
    assert runnable_ranks(table) == pytest.approx(0.55 / 0.5)
    with pytest.raises(ValueError, match="slowdown"):
        runnable_ranks(SPLIT_STEPS)


def test_slowdown_segments_are_the_stretches_where_no_rank_changed_speed():
    factors = [(1, 1)] * 3 + [(1, 3)] * 4 + [(1, 1)] * 2        # a trace 1 -> 3 -> 1 on rank 1
    table = pd.DataFrame([{"step": step, "rank": rank, "slowdown": float(k[rank])}
                          for step, k in enumerate(factors) for rank in (0, 1)])
    assert slowdown_segments(table) == [(0, 3, (1.0, 1.0)), (3, 7, (1.0, 3.0)), (7, 9, (1.0, 1.0))]


def test_efficiency_table_keeps_runs_apart_and_carries_epoch_and_global_batch():
    steps = pd.DataFrame({"run": ["equal"] * 4 + ["dbs"] * 2, "epoch": [0, 0, 1, 1, 0, 0],
                          "step": [0, 0, 1, 1, 0, 0], "rank": [0, 1, 0, 1, 0, 1], "global_batch": 64,
                          "compute_s": [0.1, 0.3, 0.2, 0.2, 0.3, 0.3]})
    table = efficiency_table(steps)
    assert table[["run", "epoch", "step"]].values.tolist() == [["equal", 0, 0], ["equal", 1, 1], ["dbs", 0, 0]]
    assert table["efficiency"].tolist() == pytest.approx([(0.1 + 0.3) / (2 * 0.3), 1.0, 1.0])


def test_time_to_reach_interpolates_between_epoch_ends_and_is_nan_when_never_reached():
    epochs = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 2, "train_loss": [1.0, 0.5, 0.3, 2.0, 1.5],
                           "wall_s": [10.0, 20.0, 30.0, 5.0, 10.0], "samples": [100] * 5})
    reach = time_to_reach(epochs, "train_loss", 0.4, lower_is_better=True).set_index("run")
    assert reach.loc["a", "time_s"] == pytest.approx(25.0)
    assert reach.loc["a", "samples"] == pytest.approx(250.0)
    assert math.isnan(reach.loc["b", "time_s"])


class _Run:
    def __init__(self, epochs):
        self.epochs = epochs


def test_tag_runs_puts_run_first_and_a_seed_after_it_for_runs_repeated_per_seed():
    one = pd.DataFrame({"epoch": [0, 1], "test_acc": [0.5, 0.6]})
    table = tag_runs({"static": one, "pid": one.iloc[:1]})
    assert list(table.columns) == ["run", "epoch", "test_acc"] and table["run"].tolist() == ["static", "static", "pid"]
    seeded = {("equal", 0): _Run(one), ("equal", 1): _Run(one.iloc[:1])}
    table = tag_runs(seeded, table="epochs", balancer={("equal", 0): "equal", ("equal", 1): "equal"})
    assert list(table.columns) == ["run", "seed", "balancer", "epoch", "test_acc"]
    assert table[["run", "seed"]].values.tolist() == [["equal", 0], ["equal", 0], ["equal", 1]]
    assert list(of_seed(seeded, 1)) == ["equal"] and of_seed(seeded, 1)["equal"] is seeded["equal", 1]


def test_the_sweep_replaces_the_slowest_ranks_factor_and_its_runs_feed_the_speedup_table():
    sweep = slowdown_sweep(["equal", "dbs"], [1, 3], [2, 4.5])
    assert sweep == {"equal k=2": ("equal", [1, 2]), "dbs k=2": ("dbs", [1, 2]),
                     "equal k=4.5": ("equal", [1, 4.5]), "dbs k=4.5": ("dbs", [1, 4.5])}
    rates = {"equal": 100.0, "dbs": 180.0, "equal k=2": 100.0, "dbs k=2": 140.0, "equal k=4.5": 100, "dbs k=4.5": 1}
    runs = {label: _Run(pd.DataFrame({"epoch": [0, 1], "samples_per_s": [1.0, rate]})) for label, rate in rates.items()}
    epochs = balancer_table(runs, [1, 3], sweep, table="epochs")
    last = epochs.groupby("run", sort=False).tail(1).set_index("run")
    assert last.loc["dbs", ["balancer", "slowest", "slowdown"]].tolist() == ["dbs", 3, "1,3"]
    assert last.loc["dbs k=4.5", ["balancer", "slowest", "slowdown"]].tolist() == ["dbs", 4.5, "1,4.5"]
    table = speedup_table(epochs)
    assert table[["slowest", "balancer"]].values.tolist() == [[2, "equal"], [2, "dbs"], [3, "equal"], [3, "dbs"],
                                                               [4.5, "equal"], [4.5, "dbs"]]
    assert table["speedup"].tolist() == pytest.approx([1.0, 1.4, 1.0, 1.8, 1.0, 0.01])


def test_speedup_table_divides_last_epoch_throughput_by_the_equal_split():
    epochs = pd.DataFrame({"balancer": ["equal", "equal", "dbs", "dbs"], "slowest": 3, "slowdown": "1,3",
                           "epoch": [0, 1, 0, 1], "samples_per_s": [100.0, 110.0, 100.0, 198.0]})
    table = speedup_table(epochs).set_index("balancer")
    assert table.loc["dbs", "speedup"] == pytest.approx(1.8)
    assert table.loc["equal", "speedup"] == pytest.approx(1.0)
    assert table.loc["dbs", "ceiling"] == pytest.approx(2.0)


def test_rank_legend_takes_each_ranks_factors_from_the_first_run_that_has_it():
    from dynbatch_core.study import plots
    two = pd.DataFrame({"run": "2 ranks", "step": [0, 0, 1, 1], "rank": [0, 1, 0, 1], "rank_batch": [8, 8, 12, 4],
                        "slowdown": [1.0, 1.0, 1.0, 3.0]})
    four = pd.DataFrame({"run": "4 ranks", "step": 0, "rank": [0, 1, 2, 3], "rank_batch": 4,
                         "slowdown": [1.0, 1.0, 2.0, 4.0]})
    fig = plots.rank_batches_over_steps(pd.concat([two, four], ignore_index=True))
    labels = [text.get_text() for text in fig.axes[-1].get_legend().get_texts()]
    assert labels == ["rank 0 (k=1)", "rank 1 (k=1→3)", "rank 2 (k=2)", "rank 3 (k=4)"]


def test_priced_time_charges_every_epoch_at_its_batch_the_median_price_so_a_load_spike_in_one_run_does_not_count():
    epochs = pd.DataFrame({"run": ["a", "a", "b", "b"], "global_batch": [32, 32, 32, 64],
                           "samples": [1000, 1000, 1000, 2000], "epoch_s": [2.0, 4.0, 2.0, 2.0]})
    priced = priced_time(epochs)   # 32: median(2, 4, 2) ms a sample = 2 ms; 64: 1 ms
    assert priced["priced_s"].tolist() == pytest.approx([2.0, 4.0, 2.0, 4.0])


def test_seed_band_decides_only_when_every_seed_lies_on_one_side():
    assert seed_band([1.2, 1.5, 1.3])["side"] == "above" and seed_band([0.8, 0.9])["side"] == "below"
    band = seed_band([0.9, 1.4, 1.1])
    assert band["side"] == "within" and (band["low"], band["median"], band["high"]) == (0.9, 1.1, 1.4)
    assert seed_band([1.05, 1.2], against=1.1)["side"] == "within" and seed_band([2.0])["side"] == "one seed"
    assert "no difference" in describe_band(band, "x over y:") and "a difference" in describe_band(
        seed_band([1.2, 1.5]), "x over y:")


def test_seeded_race_races_each_seed_to_the_lowest_best_accuracy_of_its_runs():
    rows = []
    for seed, (slow_acc, fast_time, fast_last) in enumerate([(0.8, 5.0, 0.95), (0.6, 20.0, 0.55)]):
        rows += [{"run": "equal", "seed": seed, "test_acc": acc, "wall_s": t, "samples": 100}
                 for acc, t in [(0.5, 10.0), (slow_acc, 20.0)]]
        rows += [{"run": "pid", "seed": seed, "test_acc": acc, "wall_s": t, "samples": 100}
                 for acc, t in [(0.9, fast_time), (fast_last, 2 * fast_time)]]
    race = seeded_race(pd.DataFrame(rows), "equal")
    pid = race[race["run"] == "pid"].set_index("seed")
    # seed 1: pid's late dip to 0.55 does not make 0.55 the target (equal would reach it at 15 s, a 0.75x)
    assert race.groupby("seed")["target"].first().tolist() == [0.8, 0.6]
    assert pid["speedup"].tolist() == pytest.approx([20 / 5, 20 / 20])   # equal reaches its best at its end
