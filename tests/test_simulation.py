"""The cluster simulator: the engine's own splits on emulated costs (committed engine tables and one live run), the
cost model's numbers, calibration recovering known costs, large clusters, the CLI and its errors, no torch."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dynbatch_core.config import RunConfig
from dynbatch_core.simulation import calibration, profiles
from dynbatch_core.simulation.cluster import Cluster, Network, RankCost, SimulatedOutOfMemory, ring_allreduce_s
from dynbatch_core.simulation.learning import LearningCurve
from dynbatch_core.simulation.simulator import read_steps_summary, simulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from record_engine_splits import BALANCERS, KEPT, OPTIONS, SCENARIOS  # noqa: E402

ENGINE_SPLITS = REPO / "outputs" / "benchmarks" / "engine_splits.csv"
COMPARED = KEPT[2:]   # epoch, step, rank, rank_batch, global_batch, slowdown, compute_s


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("balancer", BALANCERS)
def test_the_simulator_splits_every_step_as_the_engine_did_on_emulated_costs(tmp_path, scenario, balancer):
    engine = pd.read_csv(ENGINE_SPLITS).query("scenario == @scenario and balancer == @balancer")
    slowdown = SCENARIOS[scenario]
    config = RunConfig(**OPTIONS, world_size=len(slowdown), slowdown=slowdown, balancer=balancer)
    simulated = simulate(config, out=tmp_path, overwrite=True).steps
    assert len(engine) == len(simulated) == 3 * 16 * len(slowdown)   # 16 steps an epoch, the last one short
    pd.testing.assert_frame_equal(simulated[COMPARED].reset_index(drop=True), engine[COMPARED].reset_index(drop=True),
                                  check_exact=True, check_dtype=False)
    if balancer != "equal":
        assert engine.query("rank == 0").rank_batch.nunique() > 1   # the balancer moved the split


@pytest.mark.slow
def test_a_live_engine_run_with_prefetching_workers_and_a_slowdown_trace_is_split_as_simulated(tmp_path):
    """Lookahead 4 (2 workers x prefetch 2: a split planned 4 steps before it trains), a rank that slows at step 3,
    a short last step (300 = 9 x 32 + 12): what the fixtures lack. One epoch: each epoch starts the loader's workers
    anew, seconds each here."""
    from dynbatch_core import run
    options = dict(dataset="synthetic", model="resnet8", epochs=1, train_samples=300, test_samples=32,
                   initial_batch=32, emulated_sample_ms=1.0, emulated_step_ms=4.0, skip_emulated_sleep=True,
                   balancer="pid", balance_every=1, world_size=2, slowdown_trace="0:1,1;3:1,3", loader_workers=2,
                   progress=False, checkpoints=False)
    engine = run(RunConfig(**options, out=str(tmp_path / "engine"))).steps
    simulated = simulate(RunConfig(**options), out=tmp_path / "sim").steps
    assert len(engine) == 10 * 2 and engine.rank_batch.iloc[-2:].sum() == 12
    pd.testing.assert_frame_equal(simulated[COMPARED], engine[COMPARED], check_exact=True, check_dtype=False)
    assert engine.query("rank == 1 and step == 8").rank_batch.item() < 16   # pid moved samples off the slow rank


def test_a_rank_costs_its_line_times_its_slowdown_and_the_ring_all_reduce_follows_alpha_beta():
    rank = RankCost(a_s=0.01, c_s=0.002, saturation_batch=8)
    cluster = Cluster((rank, RankCost(a_s=0.01, c_s=0.004)), network=Network(gradient_bytes=1e8, bandwidth_Bps=1e10,
                                                                            latency_s=1e-5, overlap=0.25))
    seconds = cluster.compute_s([4, 10], [1.0, 3.0], np.random.default_rng(0))
    assert seconds.tolist() == pytest.approx([0.01 + 8 * 0.002, (0.01 + 10 * 0.004) * 3])   # 4 < saturation: as 8
    assert cluster.compute_s([0, 10], [1.0, 1.0], np.random.default_rng(0))[0] == 0.01    # an empty slice: a
    assert ring_allreduce_s(4, 1e8, 1e10, 1e-5) == pytest.approx(2 * 3 / 4 * 0.01 + 6e-5)
    assert cluster.exposed_reduction_s() == pytest.approx(0.75 * (2 * 1 / 2 * 0.01 + 2e-5))
    assert Network(latency_s=1e-3).exposed_s(1024) == 0.0   # nothing to reduce
    with pytest.raises(SimulatedOutOfMemory, match="rank 1 .* 65 samples, its memory holds 64"):
        Cluster((rank, RankCost(0.0, 0.001, memory_batch=64))).compute_s([1, 65], [1, 1], np.random.default_rng(0))


def test_noise_has_the_asked_mean_and_spread_and_spikes_their_rate():
    noisy = Cluster((RankCost(a_s=0.0, c_s=0.001, cv=0.1, spike_prob=0.05, spike_factor=4.0),) * 2000)
    seconds = noisy.compute_s([100] * 2000, [1.0] * 2000, np.random.default_rng(1)) / 0.1
    spikes = seconds > 2.0
    assert spikes.mean() == pytest.approx(0.05, abs=0.015)
    assert seconds[~spikes].mean() == pytest.approx(1.0, abs=0.01)
    assert seconds[~spikes].std() == pytest.approx(0.1, abs=0.01)


def test_calibration_recovers_the_costs_a_simulated_run_was_drawn_from(tmp_path):
    truth = (RankCost(a_s=0.008, c_s=0.001, cv=0.04, spike_prob=0.05, spike_factor=2.5),
             RankCost(a_s=0.012, c_s=0.0025, cv=0.08))
    config = RunConfig(world_size=2, balancer="pid", balance_every=2, initial_batch=64, train_samples=640, epochs=8,
                       slowdown=(1.0, 2.0), seed=3, progress=False)
    result = simulate(config, Cluster(truth), out=tmp_path)
    fitted = calibration.cluster_from_run(result.run_dir).ranks
    for got, want in zip(fitted, truth):   # slowdown divided out: the hardware under the emulated factor
        assert got.c_s == pytest.approx(want.c_s, rel=0.15) and got.a_s == pytest.approx(want.a_s, abs=0.006)
        assert got.cv == pytest.approx(want.cv, abs=0.025)
    assert fitted[0].spike_prob == pytest.approx(0.05, abs=0.04) and fitted[0].spike_factor == pytest.approx(2.5, rel=0.2)
    assert fitted[1].spike_prob < 0.03


def test_a_large_cluster_writes_a_rank_subsample_and_every_step_in_its_summary(tmp_path):
    ranks = profiles.mix({"A100 80GB SXM4": 64, "V100 16GB": 64}, reference_sample_s=0.002)
    config = RunConfig(world_size=128, balancer="pid", initial_batch=128 * 32 + 7, train_samples=200_000, epochs=1,
                       max_steps=40, progress=False)
    result = simulate(config, Cluster(ranks), out=tmp_path, curve=LearningCurve(critical_batch=2048))
    written = sorted(result.steps["rank"].unique())
    assert 16 <= len(written) < 128 and {0, 64, 127} <= set(written)   # both cards' first ranks and the last
    summary = read_steps_summary(result.run_dir)
    assert len(summary) == 40 and (summary.global_batch == 4103).all()
    assert summary.efficiency.iloc[-1] > summary.efficiency.iloc[0] + 0.2   # pid balanced the 2.9x faster A100s
    a100, v100 = (result.steps.query("step == 39 and rank == @r").rank_batch.item() for r in (0, 64))
    assert 2.3 < a100 / v100 < 3.5   # throughput ratio 1066 / 369 = 2.89 (profiles)
    stored = json.loads((result.run_dir / "config.json").read_text())["simulation"]
    assert stored["rank_rows"] == written and stored["cluster"]["rank_costs"][0]["ranks"] == [[0, 63]]
    progress = summary.progress.iloc[-1]
    assert progress == pytest.approx(40 / (1 + 2048 / 4103))   # McCandlish: each step 1 / (1 + B_crit / B)


def test_the_cli_simulates_without_torch_and_refuses_bad_input_in_one_line(tmp_path):
    command = [sys.executable, "-c", "import sys, runpy; sys.argv = ['dynbatch_core'] + sys.argv[1:]; "
               "runpy.run_module('dynbatch_core', run_name='__main__', alter_sys=True)"]
    probe = ("import sys; from dynbatch_core.cli import main; code = main(sys.argv[1:]); "
             "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)")
    ok = subprocess.run([sys.executable, "-c", probe, "simulate", "--devices", "A10:2,RTX 3090:2", "--batch-size",
                         "67", "--train-samples", "670", "--epochs", "2", "--balancer", "dbs", "--out",
                         str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    epochs = pd.read_csv(tmp_path / "run" / "epochs.csv")
    assert epochs.world_size.tolist() == [4, 4] and epochs.steps.tolist() == [10, 10]
    for args, message in ((["--devices", "A1000:2"], "unknown device 'A1000'"),
                          (["--train-samples", "10"], "say what the ranks cost"),
                          (["--devices", "A10:2", "--world-size", "3", "--train-samples", "10"],
                           "the cluster has 2 ranks, --world-size is 3"),
                          (["--devices", "A10:2"], "needs --train-samples")):
        bad = subprocess.run(command + ["simulate", *args], capture_output=True, text=True, cwd=REPO)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "runs").exists()
