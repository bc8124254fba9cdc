"""SlowdownPlan: static slowdowns, inline traces, CSV traces, and the one-line errors for bad ones."""
import pytest

from dynbatch_core.engine.emulation import SlowdownPlan


def test_no_slowdown_means_every_rank_at_full_speed_forever():
    plan = SlowdownPlan.from_options(3)
    assert plan == SlowdownPlan(change_steps=(0,), factors=((1.0, 1.0, 1.0),))
    assert plan.factor(rank=2, step=10**6) == 1.0


def test_static_slowdown_holds_at_every_step():
    plan = SlowdownPlan.from_options(2, slowdown=(1, 3))
    assert plan == SlowdownPlan(change_steps=(0,), factors=((1.0, 3.0),))
    assert [plan.factor(1, step) for step in (0, 1, 500)] == [3.0, 3.0, 3.0]
    assert plan.factors_at(7) == (1.0, 3.0)


def test_inline_trace_holds_each_row_from_its_step_until_the_next():
    plan = SlowdownPlan.from_options(2, trace="0:1,1;100:1,3;200:1,1")
    assert plan.change_steps == (0, 100, 200)
    assert plan.factors == ((1.0, 1.0), (1.0, 3.0), (1.0, 1.0))
    assert [plan.factor(1, step) for step in (0, 99, 100, 199, 200, 10**6)] == [1.0, 1.0, 3.0, 3.0, 1.0, 1.0]
    assert plan.factor(0, 150) == 1.0


def test_inline_trace_rows_are_sorted_and_a_missing_step_0_means_full_speed():
    assert SlowdownPlan.from_options(2, trace="200:1,1;0:2,1;100:1,3") == SlowdownPlan(
        change_steps=(0, 100, 200), factors=((2.0, 1.0), (1.0, 3.0), (1.0, 1.0)))
    assert SlowdownPlan.from_options(4, trace="50:1,1,2,4") == SlowdownPlan(
        change_steps=(0, 50), factors=((1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 2.0, 4.0)))


def test_an_inline_trace_longer_than_a_file_name_may_be_is_read_inline():
    factors = ",".join(["1"] * 512 + ["3"] * 512)      # 1024 ranks: ~4 KB, past the OS's name limit
    plan = SlowdownPlan.from_options(1024, trace=f"0:{factors};100:{factors}")
    assert plan.change_steps == (0, 100) and plan.factors_at(150)[511:513] == (1.0, 3.0)


def test_inline_trace_tolerates_spaces_and_fractional_factors():
    plan = SlowdownPlan.from_options(2, trace=" 0 :1, 2.5 ; 10:1.5,1")
    assert plan == SlowdownPlan(change_steps=(0, 10), factors=((1.0, 2.5), (1.5, 1.0)))


def test_csv_trace_with_header_and_comments(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("step,k_0,k_1\n# rank 1 slows down, then recovers\n0,1,1\n40,1,3\n\n80,1,1\n")
    plan = SlowdownPlan.from_options(2, trace=str(path))
    assert plan == SlowdownPlan(change_steps=(0, 40, 80), factors=((1.0, 1.0), (1.0, 3.0), (1.0, 1.0)))
    assert plan.factor(1, 79) == 3.0


def test_csv_trace_without_header(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("10,1,1,2,4\n20,1,1,1,1\n")
    plan = SlowdownPlan.from_options(4, trace=str(path))
    assert plan.change_steps == (0, 10, 20)
    assert plan.factors_at(15) == (1.0, 1.0, 2.0, 4.0)


@pytest.mark.parametrize("trace", ["0:1,1;", "", "0-1,1", "x:1,1", "0:1,fast", "0:1;1"])
def test_malformed_inline_trace_is_one_clear_error(trace):
    with pytest.raises(ValueError, match=r"^--slowdown-trace .*expected a CSV file with rows step,k_0"):
        SlowdownPlan.from_options(2, trace=trace)


def test_malformed_csv_trace_is_one_clear_error(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("step,k_0,k_1\n0,1,1\nten,1,3\n")
    with pytest.raises(ValueError, match="expected a CSV file with rows step,k_0"):
        SlowdownPlan.from_options(2, trace=str(path))


def test_trace_row_with_wrong_number_of_factors():
    with pytest.raises(ValueError, match=r"row at step 100 has 3 factors, expected 2 \(one per rank\)"):
        SlowdownPlan.from_options(2, trace="0:1,1;100:1,3,3")


@pytest.mark.parametrize("trace", ["0:1,0.5", "0:1,1;50:0,1", "0:1,nan"])
def test_factors_below_1_are_refused(trace):
    with pytest.raises(ValueError, match="slowdown factors must be >= 1"):
        SlowdownPlan.from_options(2, trace=trace)


def test_static_slowdown_below_1_is_refused():
    with pytest.raises(ValueError, match=r"must be >= 1 \(1 = full speed\), got \[1, 0.5\] at step 0"):
        SlowdownPlan.from_options(2, slowdown=(1, 0.5))


def test_slowdown_and_trace_together_are_refused():
    with pytest.raises(ValueError, match="either --slowdown or --slowdown-trace, not both"):
        SlowdownPlan.from_options(2, slowdown=(1, 3), trace="0:1,3")


def test_negative_trace_step_is_refused():
    with pytest.raises(ValueError, match="distinct and >= 0"):
        SlowdownPlan.from_options(2, trace="-5:1,2")


def test_duplicate_trace_step_is_refused():
    with pytest.raises(ValueError, match="distinct and >= 0"):
        SlowdownPlan.from_options(2, trace="0:1,1;0:1,3")


def test_infinite_factor_is_refused():
    with pytest.raises(ValueError, match=">= 1"):
        SlowdownPlan.from_options(2, trace="0:1,1e400")


def test_missing_trace_file_is_named():
    with pytest.raises(ValueError, match="no such file"):
        SlowdownPlan.from_options(2, trace="no-such-trace.csv")
