"""The goodput rule on synthetic step times and a known noise scale: where it goes, how it explores, no flapping."""
import math
import random

import pytest

from dynbatch_core.batching.goodput import EXPLORE_STEPS, GoodputRule
from dynbatch_core.batching.noise_scale import NoiseEstimate, NoiseScaleSmoother


NOISE = NoiseEstimate(gradient_sq=1.0, trace=256.0)   # B_simple = 256


def observe(rule, split, compute_s, estimate, overhead_s=0.0):
    """One step as the training loop feeds it: the estimate to the smoother it owns, the times to the rule."""
    rule.smoother.update(estimate)
    rule.observe(split, compute_s, overhead_s=overhead_s)


def drive(rule, observe, steps=400, start=32):
    """Ask the rule when due and call observe(batch) every step, as the training loop does; the B of every step."""
    batch, due, batches = start, 0, []
    for step in range(steps):
        if step == due:
            batch, wait = rule.decide(batch)
            due = step + wait
        observe(batch)
        batches.append(batch)
    return batches


def simulate(rule, step_s, steps=400, start=32, noise=0.0, seed=0):
    """One rank whose step takes step_s(B), times (1 ± noise)."""
    rng = random.Random(seed)
    return drive(rule, lambda b: observe(rule, [b], [step_s(b) * (1 + rng.uniform(-noise, noise))], NOISE), steps,
                 start)


def gpu_like(batch):   # a fixed 100 ms per step dominates small batches
    return 0.100 + 0.001 * batch


def test_with_a_fixed_cost_per_step_it_climbs_to_the_best_batch_and_stays():
    # goodput (256 + 32) / (256 + B) x B / (0.1 + 0.001 B): 0.84 at 32, 1.22 at 64, 1.46 at 128, 1.40 at 256
    batches = simulate(GoodputRule(initial_batch=32, min_batch=8, max_batch=1024, decide_every=20), gpu_like)
    assert batches[-100:] == [128] * 100
    assert set(batches) == {32, 64, 128, 256}       # factor-2 moves only
    assert batches.count(256) == EXPLORE_STEPS      # 256 was tried once, measured, and judged worse
    # 16 is never tried: at best it costs as much per sample as 32, and its efficiency gain (288 / 272 = 1.06)
    # cannot beat 64's measured goodput


def test_it_explores_the_most_promising_unmeasured_batch_first():
    rule = GoodputRule(initial_batch=32, min_batch=8, max_batch=1024, decide_every=20)
    for _ in range(20):
        observe(rule, [32], [gpu_like(32)], NOISE)
    # optimistic bounds relative to 32's goodput: 16 at most 1.06x (same time per sample), 64 at most
    # 2 x 288 / 320 = 1.8x (same time per step)
    assert rule.decide(32) == (64, EXPLORE_STEPS)


def test_without_a_fixed_cost_it_moves_down_while_a_halving_gains_more_than_the_threshold():
    # a sample costs the same at any B, so only efficiency counts: (256 + 16) / (256 + 32) = 0.94 (a 6 % gain for
    # halving to 16), but 16 -> 8 gains 3 %, under the 5 % threshold
    batches = simulate(GoodputRule(initial_batch=32, min_batch=8, max_batch=1024, decide_every=20),
                       lambda batch: 0.001 * batch)
    assert batches[-50:] == [16] * 50


def test_under_timing_noise_it_does_not_flap():
    batches = simulate(GoodputRule(initial_batch=32, min_batch=8, max_batch=1024, decide_every=20), gpu_like,
                       steps=800, noise=0.05)
    settled = batches[300:]
    changes = sum(1 for a, b in zip(settled, settled[1:]) if a != b)
    assert set(settled) <= {64, 128, 256} and changes <= 4, changes


def test_with_a_slow_rank_it_prices_each_batch_at_the_balanced_split_not_the_split_it_saw():
    """Rank 1 is 3x slower (fixed cost included). The rule only ever sees the equal split, where rank 1 sets every
    step's time; it must still price B at the best split of the fitted per-rank lines."""
    from dynbatch_core.batching.cost_model import AffineCost, min_max_split, predicted_step_s
    lines = [AffineCost(0.020, 0.0005), AffineCost(0.060, 0.0015)]
    rule = GoodputRule(initial_batch=32, min_batch=16, max_batch=512, decide_every=20)

    def equal_split(batch):
        split = [batch // 2, batch - batch // 2]
        observe(rule, split, [line.time_s(b) for line, b in zip(lines, split)], NOISE)
    batch = drive(rule, equal_split, steps=300)[-1]
    balanced = predicted_step_s(min_max_split(256, lines), lines)
    assert rule.step_time_s(256) == pytest.approx(balanced, rel=1e-6)
    assert balanced < 0.75 * max(line.time_s(128) for line in lines)   # the equal split's time is far off

    def goodput(b):
        return (256 + 32) / (256 + b) * b / predicted_step_s(min_max_split(b, lines), lines)
    assert batch == max((16, 32, 64, 128, 256, 512), key=goodput)


def test_a_cost_per_step_beyond_compute_counts_like_a_fixed_cost():
    """Compute costs the same per sample at any B (alone: B halves to 16, see above), but each step also spends
    100 ms in the reduction and the optimizer: B must grow instead."""
    rule = GoodputRule(initial_batch=32, min_batch=8, max_batch=1024, decide_every=20)
    batch = drive(rule, lambda b: observe(rule, [b], [0.001 * b], NOISE, overhead_s=0.1), steps=300)[-1]
    assert batch >= 128 and rule.step_time_s(64) == pytest.approx(0.1 + 0.064)


def test_no_decision_before_the_noise_scale_is_known():
    rule = GoodputRule(initial_batch=32, min_batch=8, max_batch=1024, decide_every=20)
    assert rule.decide(32) == (32, 20)
    observe(rule, [32], [0.1], NoiseEstimate(gradient_sq=-1.0, trace=-5.0))   # neither estimate positive: unknown
    assert rule.decide(32) == (32, 20)


def test_pure_noise_prices_every_batch_with_efficiency_one_and_lets_b_grow():
    """Smoothed |G|^2 <= 0 with a positive trace is the limit B_simple -> infinity: a sample buys as much progress at
    any B, so goodput is throughput alone (it used to freeze B there, as if nothing were known)."""
    rule = GoodputRule(initial_batch=32, min_batch=8, max_batch=1024, decide_every=20)
    for _ in range(3):
        observe(rule, [32], [0.01 + 0.001 * 32], NoiseEstimate(gradient_sq=-1e-4, trace=5.0))
    assert rule.noise_scale == math.inf
    assert [rule.efficiency(b) for b in (16, 32, 64, 1024)] == [1.0, 1.0, 1.0, 1.0]
    assert rule.decide(32) == (64, EXPLORE_STEPS)   # the larger B amortises the fixed cost: tried


def test_a_restored_rule_decides_like_the_original():
    """The rule's state and its owner's smoother (checkpointed apart, as the trainer does) restore its decisions."""
    original = GoodputRule(initial_batch=32, min_batch=8, max_batch=1024, decide_every=20)
    simulate(original, gpu_like, steps=70)
    smoother = NoiseScaleSmoother()
    smoother.load_state_dict(original.smoother.state_dict())
    restored = GoodputRule(initial_batch=32, min_batch=8, max_batch=1024, decide_every=20, smoother=smoother)
    restored.load_state_dict(original.state_dict())
    assert [restored.decide(64) for _ in range(3)] == [original.decide(64) for _ in range(3)]


def test_the_adascale_gain_runs_from_one_without_noise_to_linear_scaling_in_pure_noise():
    from dynbatch_core.batching.lr import adascale_gain
    assert adascale_gain(0.001, 256, 32) == pytest.approx(1.0, abs=1e-3)      # no noise: a larger B buys nothing
    assert adascale_gain(1e9, 256, 32) == pytest.approx(256 / 32, rel=1e-6)   # all noise: linear scaling
    assert adascale_gain(64.0, 128, 32) == pytest.approx((64 / 32 + 1) / (64 / 128 + 1))
    assert adascale_gain(float("nan"), 128, 32) == 1.0 and adascale_gain(-5.0, 128, 32) == 1.0
    assert adascale_gain(float("inf"), 128, 32) == 128 / 32   # the smoothed |G|^2 not positive, the trace positive


@pytest.mark.slow
def test_a_goodput_run_grows_its_batch_where_a_fixed_step_cost_dominates_and_measures_the_noise(tmp_path):
    """Emulated GPU-like costs (40 ms a step + 0.1 ms a sample): B = 16 wastes most of each step on the fixed cost."""
    from dynbatch_core import RunConfig, run
    result = run(RunConfig(dataset="synthetic", model="resnet8", norm="none", world_size=2, train_samples=1024,
                           test_samples=64, initial_batch=16, epochs=2, schedule="goodput", decide_every=8,
                           emulated_step_ms=40.0, emulated_sample_ms=0.1, skip_emulated_sleep=True, lr_scaling="adascale",
                           progress=False,
                           out=str(tmp_path / "goodput")))
    batches = result.steps.query("rank == 0").global_batch
    assert batches.iloc[0] == 16 and batches.iloc[-1] >= 64
    assert result.epochs.noise_scale.notna().all() and result.epochs.noise_missing.ge(0).all()
    assert result.steps.groupby("epoch").rank_batch.sum().tolist()[0] == 1024   # every sample once per epoch
    # AdaScale: the LR follows the gain, between 1x and B/B_0 x the base LR (before decay)
    assert result.steps.lr.max() > 0.05


@pytest.mark.slow
def test_a_goodput_run_resumed_mid_epoch_takes_the_same_batches(tmp_path, monkeypatch):
    """Emulated costs make every decision deterministic; the rule's state and the B it set inside the epoch are
    checkpointed, so a run killed after a change inside an epoch goes on with the same global batches."""
    from dynbatch_core import RunConfig, RunFailed, run
    options = dict(dataset="synthetic", model="resnet8", norm="none", world_size=2, train_samples=1024,
                   test_samples=64, initial_batch=16, epochs=2, schedule="goodput", decide_every=8,
                   emulated_step_ms=40.0, emulated_sample_ms=0.1, skip_emulated_sleep=True, checkpoint_every=5,
                   progress=False)
    reference = run(RunConfig(**options, out=str(tmp_path / "reference"))).steps
    monkeypatch.setenv("DYNBATCH_TEST_HOOKS", "1")
    monkeypatch.setenv("DYNBATCH_FAULT", "kill:1:27")
    with pytest.raises(RunFailed):
        run(RunConfig(**options, out=str(tmp_path / "resumed")))
    monkeypatch.delenv("DYNBATCH_FAULT")
    resumed = run(RunConfig(**options, out=str(tmp_path / "resumed"), resume=str(tmp_path / "resumed"))).steps
    batches = reference.query("rank == 0").global_batch.tolist()
    assert len(set(batches[:25])) > 1   # B changed inside the first epoch before the checkpoint at step 25
    assert resumed.query("rank == 0").global_batch.tolist() == batches
