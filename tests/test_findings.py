"""findings.py: the numbers of a schedule race (analysis.schedule_race) and the sentences written from them, on a
hand-made table whose numbers are worked out in the comments; the one seconds formatter."""
import math

import pandas as pd
import pytest

from dynbatch_core.study.analysis import PRICED_TIME_PHRASE, schedule_race, timing_spread
from dynbatch_core.study.findings import describe_schedule_race, format_seconds, timing_noise


def race_epochs(static_rate: float = 64.0) -> pd.DataFrame:
    """static: B 64, loss 1.0 -> 0.5 at 10 s, 20 s; decreasing: B 128 -> 64, loss 0.8 -> 0.6 at 5 s, 15 s; 640
    samples an epoch. Target = the highest final loss, 0.6: static reaches it 0.8 into its second epoch (18 s,
    1152 samples), decreasing at its end (15 s, 1280 samples)."""
    return pd.DataFrame({"run": ["static", "static", "decreasing", "decreasing"], "epoch": [0, 1, 0, 1],
                         "global_batch": [64, 64, 128, 64], "train_loss": [1.0, 0.5, 0.8, 0.6],
                         "wall_s": [10.0, 20.0, 5.0, 15.0], "samples": 640,
                         "samples_per_s": [static_rate, static_rate, 128.0, 64.0]})


def test_a_schedule_race_is_won_by_the_faster_processing_of_samples_when_the_winner_needed_more_of_them():
    race = schedule_race(race_epochs())
    assert race["target"] == 0.6 and race["reach"]["run"].tolist() == ["decreasing", "static"]
    assert race["reach"]["time_s"].tolist() == pytest.approx([15.0, 18.0])
    assert race["reach"]["samples"].tolist() == pytest.approx([1280.0, 1152.0])
    assert race["time_ratio"] == pytest.approx(1.2) and race["sample_ratio"] == pytest.approx(0.9)
    assert race["rate_ratio"] == pytest.approx((1280 / 15) / 64) and race["decided_by"] == "rate"
    # B = 64 is the only batch both used, at 64 samples/s in both: no timing noise, so the race ranks by time
    assert race["spread"] == 1.0 and race["ranked_by"] == "time" and race["two_first"] == ["decreasing", "static"]
    assert not race["agree"] and race["batches"] == {"static": [64, 64], "decreasing": [128, 64]}
    findings, comparison = describe_schedule_race(race)
    assert findings[0] == ("Time to reach training loss 0.6 (the highest final loss, so every run reaches it): "
                           "decreasing 15 s, static 18 s.")
    assert findings[1] == "Global batch per epoch: static 64 → 64; decreasing 128 → 64."
    assert findings[2] == ("decreasing beat static by 1.20×: it needed 1280 samples instead of 1152 (0.90×) at 85 "
                           "instead of 64 samples/s (1.33×), so mostly faster processing of samples.")
    assert findings[3].startswith("Large batches are faster per sample here (median 64 samples/s at B = 64 vs 128 "
                                  "at B = 128)")
    assert findings[4] == "Samples needed to reach it (not affected by timing noise): static 1152, decreasing 1280."
    assert comparison[0] == ("Unlike the class study (4 GPUs: decreasing and loss-plateau fastest), the two fastest "
                             "here were decreasing and static; decreasing won mostly through faster processing of "
                             "samples.")
    assert "(here B = 128 ran only 2.0× faster per sample than B = 64)" in comparison[1]


def test_inside_the_timing_noise_a_schedule_race_ranks_by_samples_needed_and_says_so():
    epochs = race_epochs(static_rate=32.0)   # at B = 64: static 32, decreasing 64 samples/s -> spread 2
    assert timing_spread(epochs) == {"spread": 2.0, "batch": 64, "low": 32.0, "low_run": "static", "high": 64.0,
                                     "high_run": "decreasing"}
    race = schedule_race(epochs)
    assert race["ranked_by"] == "samples" and race["two_first"] == ["static", "decreasing"]
    findings, comparison = describe_schedule_race(race)
    assert findings[-2] == timing_noise(epochs)[1] and "below about 2.0×" in findings[-2]
    assert comparison[0] == ("This run cannot rank the schedules by time: all reached the target within 1.20× of "
                             "each other, inside the 2.0× timing noise. By samples needed, the two most efficient "
                             "were static and decreasing, not the class study's two fastest (decreasing and "
                             "loss-plateau).")


def test_on_priced_time_the_race_ignores_timing_noise_and_gives_the_wall_clock_beside_it():
    epochs = race_epochs(static_rate=32.0).assign(priced_s=[20.0, 40.0, 10.0, 30.0])   # twice the wall times
    race = schedule_race(epochs, time_column="priced_s")
    assert race["timing"] is None and race["spread"] == 1.0 and race["ranked_by"] == "time"
    assert race["wall_s"] == pytest.approx({"static": 18.0, "decreasing": 15.0})
    findings, _ = describe_schedule_race(race)
    assert findings[0].endswith(f"on {PRICED_TIME_PHRASE}: decreasing 30 s, static 36 s.")
    assert findings[1] == "On the wall clock, which other work on the machine moves: decreasing 15 s, static 18 s."
    assert not any(sentence.startswith("Timing noise") for sentence in findings)


def test_seconds_have_one_decimal_fewer_from_ten_seconds_on_and_a_time_never_reached_is_never():
    assert [format_seconds(t) for t in (4.24, 42.4, 420.0)] == ["4.2 s", "42 s", "420 s"]
    assert [format_seconds(t, decimals=2) for t in (3.14159, 31.4159)] == ["3.14 s", "31.4 s"]
    assert format_seconds(math.inf) == format_seconds(math.nan, decimals=2) == "never"
