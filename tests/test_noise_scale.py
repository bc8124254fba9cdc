"""The gradient noise scale estimator against truth: (a) linear least squares at fixed weights, analytic; (b) a ResNet
at a saved checkpoint, from its per-sample gradients, and the engine's recorded points against the same gradients."""
import math

import pytest
import torch

from dynbatch_core.batching.balancer_base import largest_remainder_split
from dynbatch_core.batching.goodput import GoodputRule
from dynbatch_core.batching.lr import adascale_gain
from dynbatch_core.batching.noise_scale import (NoiseEstimate, NoiseScaleSmoother, epoch_noise_scale, fit_step, step_points,
                                       without_replacement_x)
from dynbatch_core.engine.sampler import epoch_order, rank_slices

N, FEATURES, BATCH = 4096, 10, 64


@pytest.fixture(scope="module")
def per_sample_gradients():
    """Gradients of 1/2 (w.x - y)^2 at fixed w (lr = 0: the weights never move), y = w*.x + Gaussian noise."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, FEATURES, generator=generator, dtype=torch.float64)
    w_star = torch.randn(FEATURES, generator=generator, dtype=torch.float64)
    y = x @ w_star + torch.randn(N, generator=generator, dtype=torch.float64)
    w = w_star + 0.1 * torch.randn(FEATURES, generator=generator, dtype=torch.float64)
    return (x @ w - y)[:, None] * x


def truth(gradients):
    """|G|^2 and S = tr(Sigma) of the N per-sample gradients (Sigma normalised by N)."""
    mean = gradients.mean(dim=0)
    return float(mean @ mean), float(((gradients - mean) ** 2).sum(dim=1).mean())


def estimates_over_epochs(gradients, split, epochs=12):
    """Per step: each 'rank' sums its slice's gradients / B (what it holds before the reduction), the global sum after."""
    found = []
    for epoch in range(epochs):
        order = epoch_order(N, seed=0, epoch=epoch)
        for offset in range(0, N - BATCH + 1, BATCH):
            step = gradients[order[offset:offset + BATCH]]
            local = [step[start:stop].sum(dim=0) / BATCH for start, stop in rank_slices(split)]
            total = step.sum(dim=0) / BATCH   # one rank: local holds only the first half
            points = step_points([float(g @ g) for g in local], split, BATCH, float(total @ total))
            found.append(fit_step(points, num_samples=N))
    return found


@pytest.mark.parametrize("split", [[32],                   # one rank: the norm after the first of two halves
                                   [32, 32], [16, 48],     # two ranks, equal and uneven
                                   [16, 16, 16, 16], [4, 12, 20, 28]])   # four ranks
def test_the_estimate_matches_the_analytic_noise_of_least_squares(per_sample_gradients, split):
    gradient_sq, trace = truth(per_sample_gradients)
    assert 20 < trace / gradient_sq < 500   # a noise scale in the range of the batches, where it matters
    found = estimates_over_epochs(per_sample_gradients, split)
    mean_gradient_sq = sum(e.gradient_sq for e in found) / len(found)
    mean_trace = sum(e.trace for e in found) / len(found)
    noise_scale, missing = epoch_noise_scale(found)
    assert mean_gradient_sq == pytest.approx(gradient_sq, rel=0.15)
    assert mean_trace == pytest.approx(trace, rel=0.15)
    assert noise_scale == pytest.approx(trace / gradient_sq, rel=0.15)
    assert 0 < missing < len(found)   # single steps do go negative; they are counted, not clamped


def test_without_replacement_an_epoch_sized_batch_has_no_noise():
    assert without_replacement_x(N, N) == 0
    assert without_replacement_x(1, N) == pytest.approx(1.0)
    assert without_replacement_x(64, 10**9) == pytest.approx(1 / 64)


def test_a_rank_gradient_is_scaled_to_its_own_mean_and_empty_slices_are_left_out():
    points = step_points([0.25, 0.0, 1.0], [16, 0, 48], 64, 0.5)
    assert points == [(16, 0.25 * 16), (48, 1.0 * (64 / 48) ** 2), (64, 0.5)]


def test_one_batch_size_gives_no_estimate_and_a_negative_gradient_estimate_is_missing_not_clamped():
    assert fit_step([(64, 1.0), (64, 1.2)], num_samples=N) is None
    noisy = NoiseEstimate(gradient_sq=-0.01, trace=3.0)
    assert noisy.missing and math.isnan(noisy.noise_scale)
    assert epoch_noise_scale([noisy, NoiseEstimate(0.03, 1.0), None]) == (pytest.approx(2.0 / 0.01), 2)


def test_the_smoother_averages_numerator_and_denominator_apart():
    smoother = NoiseScaleSmoother(decay=0.5)
    assert math.isnan(smoother.noise_scale)
    smoother.update(NoiseEstimate(gradient_sq=1.0, trace=10.0))
    assert smoother.noise_scale == pytest.approx(10.0)
    smoother.update(NoiseEstimate(gradient_sq=-1.0, trace=30.0))   # averages -0.25 and 17.5: pure noise, +inf
    assert smoother.noise_scale == math.inf
    smoother.update(NoiseEstimate(gradient_sq=1.0, trace=10.0))    # 0.375 and 13.75: a ratio of averages
    assert smoother.noise_scale == pytest.approx(13.75 / 0.375)
    smoother.update(NoiseEstimate(gradient_sq=-5.0, trace=-50.0))  # neither average positive: unknown, NaN
    assert math.isnan(smoother.noise_scale)


def healthy_points():   # |G|^2 = 1, S = 100: E|g_b|^2 = 1 + 100/b on a [16, 48] split of 64
    return step_points([(16 / 64) ** 2 * (1 + 100 / 16), (48 / 64) ** 2 * (1 + 100 / 48)], [16, 48], 64, 1 + 100 / 64)


def test_one_overflowed_step_is_missing_and_never_poisons_the_smoothed_or_epoch_noise_scale():
    """A float16 step whose loss scale overflowed reports inf norms (GradScaler then skips it). It gives no estimate,
    counts as missing, and the averages stay those of the healthy steps (one inf used to leave them NaN for good)."""
    smoother = NoiseScaleSmoother()
    rule = GoodputRule(initial_batch=64, min_batch=2, max_batch=1024, decide_every=1, smoother=smoother)
    overflowed = step_points([math.inf, math.inf], [16, 48], 64, math.inf)
    estimates = []
    for points in [healthy_points()] * 100 + [overflowed] + [healthy_points()] * 1000:
        estimate = fit_step(points, 60000)
        smoother.update(estimate)
        rule.observe([16, 48], [0.1, 0.1])
        estimates.append(estimate)
    healthy = fit_step(healthy_points(), 60000).noise_scale   # 99.8: B_simple 100 seen through x(b) at N = 60000
    assert estimates[100] is None
    assert smoother.noise_scale == pytest.approx(healthy, rel=1e-9)
    assert rule.noise_scale == smoother.noise_scale   # the rule reads the smoother it was given
    epoch_scale, missing = epoch_noise_scale(estimates)
    assert missing == 1 and epoch_scale == pytest.approx(smoother.noise_scale)
    assert adascale_gain(smoother.noise_scale, 128, 64) == pytest.approx((healthy / 64 + 1) / (healthy / 128 + 1))
    # a non-finite estimate handed to the averages directly is dropped there too
    smoother.update(NoiseEstimate(math.nan, math.inf))
    assert smoother.noise_scale == pytest.approx(healthy, rel=1e-9)


@pytest.mark.parametrize("gradient_sq", [0.0, -1e-6, -1e-4])
def test_adascale_gain_at_pure_noise_is_the_linear_limit_b_over_b0_not_one(gradient_sq):
    smoother = NoiseScaleSmoother()
    smoother.update(NoiseEstimate(gradient_sq=gradient_sq, trace=100.0))
    for batch, initial in ((128, 64), (64, 16), (16, 64)):
        assert adascale_gain(smoother.noise_scale, batch, initial) == pytest.approx(batch / initial, rel=0.01)
    assert adascale_gain(NoiseScaleSmoother().noise_scale, 128, 64) == 1.0       # nothing measured yet
    negative = NoiseScaleSmoother()
    negative.update(NoiseEstimate(gradient_sq=gradient_sq, trace=-1.0))
    assert adascale_gain(negative.noise_scale, 128, 64) == 1.0                   # no positive trace either


# --- (b) a ResNet at a saved checkpoint: the estimator against its per-sample gradients, the engine against both --
# MNIST at initialisation has B_simple ~ 270; a global batch of 256 (of 512 samples) keeps the global point's noise
# S x(256) below |G|^2, so 40 steps pin |G|^2 down (a 64-sample batch would need thousands).
RESNET = dict(dataset="mnist", model="resnet8", norm="none", train_samples=512, test_samples=32, initial_batch=256,
              lr=0.0, measure_noise=True, progress=False, checkpoints=False)
RESNET_SPLITS = [(1, None), (2, None), (2, (1.0, 3.0)), (4, None), (4, (1.0, 2.0, 3.0, 4.0))]


def split_of(world_size, weights, batch=256):
    """The split the `weights` balancer (`rank_weights`) gives, or equal's."""
    return largest_remainder_split(batch, weights or (1.0,) * world_size)


@pytest.fixture(scope="module")
def resnet_gram(tmp_path_factory):
    """The Gram matrix K_ij = g_i . g_j of the 512 training samples' gradients at the weights the runs hold (lr = 0
    keeps them: the model.pt a run saves), one backward pass per sample. Every squared norm of a batch's summed
    gradient is a sum of K's entries, so the estimator can be replayed exactly for any split and any number of steps."""
    from conftest import SHARED_DATA
    from dynbatch_core import RunConfig, run
    from dynbatch_core.data import load_datasets
    from dynbatch_core.models import build_model
    if not (SHARED_DATA / "mnist.npz").exists():
        pytest.skip(f"offline data not found at {SHARED_DATA} (set DYNBATCH_TEST_DATA)")
    folder = tmp_path_factory.mktemp("truth")
    saved = run(RunConfig(**{**RESNET, "measure_noise": False}, epochs=1, data_dir=str(SHARED_DATA), world_size=1,
                          out=str(folder / "weights")))
    train, _, _ = load_datasets("mnist", data_dir=SHARED_DATA, train_samples=512, test_samples=32, seed=0)
    model = build_model("resnet8", in_channels=train.spec.in_channels, num_classes=train.spec.num_classes, norm="none")
    model.load_state_dict(torch.load(saved.run_dir / "model.pt", weights_only=True))
    parameters = [p for p in model.parameters() if p.requires_grad]
    images, labels = train.__getitems__(list(range(512)))
    gradients = []
    for image, label in zip(images, labels):
        loss = torch.nn.functional.cross_entropy(model(image[None]), label[None])
        gradients.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, parameters)]).double())
    gradients = torch.stack(gradients)
    return SHARED_DATA, gradients @ gradients.T


def gram_truth(gram):
    """|G|^2 and S = tr(Sigma) from the Gram matrix (Sigma normalised by N)."""
    gradient_sq = float(gram.mean())
    return gradient_sq, float(gram.diagonal().mean()) - gradient_sq


def replayed_points(gram, order, split, batch=256):
    """A step's noise points as the engine forms them: each rank's slice of the step's samples (one rank: the first
    half), its summed gradient / B, and the whole step's."""
    def sq_norm(indices):
        return float(gram[indices][:, indices].sum()) / batch ** 2
    slices = [(0, batch // 2)] if len(split) == 1 else rank_slices(split)
    batches = [stop - start for start, stop in slices]
    return step_points([sq_norm(order[start:stop]) for start, stop in slices], batches, batch, sq_norm(order))


def replayed_estimates(gram, split, epochs, batch=256, num_samples=512):
    """Per epoch, the estimates of its steps, in the engine's sample order (sampler.epoch_order, seed 0)."""
    per_epoch = []
    for epoch in range(epochs):
        order = epoch_order(num_samples, seed=0, epoch=epoch)
        per_epoch.append([fit_step(replayed_points(gram, order[offset:offset + batch], split, batch), num_samples)
                          for offset in range(0, num_samples - batch + 1, batch)])
    return per_epoch


@pytest.mark.slow
@pytest.mark.parametrize("world_size, weights", RESNET_SPLITS)
def test_the_estimate_matches_the_noise_of_a_resnet_within_15_percent(resnet_gram, world_size, weights):
    """20 epochs of the engine's steps (40), replayed from the per-sample gradients."""
    _, gram = resnet_gram
    gradient_sq, trace = gram_truth(gram)
    found = [estimate for epoch in replayed_estimates(gram, split_of(world_size, weights), epochs=20)
             for estimate in epoch]
    measured_gradient_sq = sum(e.gradient_sq for e in found) / len(found)
    measured_trace = sum(e.trace for e in found) / len(found)
    assert measured_gradient_sq == pytest.approx(gradient_sq, rel=0.15)
    assert measured_trace == pytest.approx(trace, rel=0.15)
    assert measured_trace / measured_gradient_sq == pytest.approx(trace / gradient_sq, rel=0.15)


@pytest.mark.slow
@pytest.mark.parametrize("world_size, weights", RESNET_SPLITS)
def test_the_engine_records_exactly_the_points_and_estimates_the_per_sample_gradients_give(tmp_path, resnet_gram,
                                                                                          world_size, weights):
    """The engine's squared norms, step by step, and its epoch estimates equal the replay above (float32 sums)."""
    from dynbatch_core import RunConfig, run
    data_dir, gram = resnet_gram
    gradient_sq, trace = gram_truth(gram)
    result = run(RunConfig(**RESNET, epochs=2, data_dir=str(data_dir), world_size=world_size, rank_weights=weights,
                           out=str(tmp_path / "run")))
    split = split_of(world_size, weights)
    steps = result.steps.sort_values(["epoch", "step", "rank"])
    assert steps.groupby(["epoch", "step"]).rank_batch.apply(list).tolist() == [split] * 4
    replayed = replayed_estimates(gram, split, epochs=2)
    for (epoch, step_in_epoch), rows in zip([(0, 0), (0, 1), (1, 0), (1, 1)], steps.groupby(["epoch", "step"])):
        order = epoch_order(512, seed=0, epoch=epoch)[256 * step_in_epoch:256 * (step_in_epoch + 1)]
        points = replayed_points(gram, order, split)
        assert rows[1].global_grad_sq.tolist() == pytest.approx([points[-1][1]] * world_size, rel=1e-4)
        if world_size > 1:   # rank i's squared norm of its own slice's mean gradient
            assert rows[1].rank_grad_sq.tolist() == pytest.approx([y for _, y in points[:-1]], rel=1e-4)
    for epoch, row in result.epochs.iterrows():   # a mean of differences: compared on the scale of the truth
        estimates = replayed[epoch]
        assert row.noise_gradient_sq == pytest.approx(sum(e.gradient_sq for e in estimates) / 2, abs=1e-3 * gradient_sq)
        assert row.noise_trace == pytest.approx(sum(e.trace for e in estimates) / 2, abs=1e-3 * trace)
        assert row.noise_missing == sum(e.missing for e in estimates)
    if weights:   # the split really was uneven
        assert split[0] < split[-1]


@pytest.mark.slow
def test_stock_ddp_measures_the_same_norms_as_the_explicit_reduction(tmp_path):
    """DDP's comm hook sees each rank's gradient bucket before the sum: the same points as the explicit path."""
    from dynbatch_core import RunConfig, run
    options = dict(dataset="synthetic", model="resnet8", norm="none", world_size=2, rank_weights=(1.0, 3.0),
                   train_samples=256, test_samples=32, initial_batch=64, epochs=1, measure_noise=True, progress=False,
                   checkpoints=False)
    explicit = run(RunConfig(**options, gradient_sync="explicit", out=str(tmp_path / "explicit"))).steps
    ddp = run(RunConfig(**options, gradient_sync="ddp", out=str(tmp_path / "ddp"))).steps
    for column in ("rank_grad_sq", "global_grad_sq"):
        assert ddp[column].tolist() == pytest.approx(explicit[column].tolist(), rel=1e-5)
    assert explicit.query("rank == 0").rank_grad_sq.ne(explicit.query("rank == 0").global_grad_sq).all()
