"""The CUDA/NCCL path on one GPU (skipped without CUDA; CI has none): run these wherever a GPU is lent.

One GPU allows one rank only (NCCL refuses two ranks on one device), so the uneven-split exactness is covered by
the CPU tests; these check what only CUDA runs: NCCL, stock DDP with CUDA-event timing, SyncBatchNorm, fp16.
"""
import pytest
import torch

from dynbatch_core import RunConfig, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(tmp_path, name, **overrides):
    values = dict(dataset="synthetic", model="resnet8", norm="none", world_size=1, epochs=1, train_samples=256,
                  test_samples=256, initial_batch=16, lr=0.1, momentum=0.9, progress=False, out=str(tmp_path / name))
    result = run(RunConfig(**{**values, **overrides}))
    return result, torch.load(result.run_dir / "model.pt", weights_only=True, map_location="cpu")


def test_a_gpu_rank_trains_the_weights_a_cpu_rank_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")   # TF32 convolutions would differ from the CPU by ~1e-3
    _, on_cpu = train(tmp_path, "cpu", device="cpu")
    result, on_gpu = train(tmp_path, "gpu", device="cuda")
    assert result.config["resolved"]["gradient_sync"] == "ddp"
    assert (result.steps.compute_s > 0).all()
    worst = max((on_gpu[key] - on_cpu[key]).abs().max().item() for key in on_cpu)
    print(f"largest weight difference GPU vs CPU after {len(result.steps)} steps: {worst:.2e}")
    assert worst < 1e-3


@pytest.mark.parametrize("gradient_sync", ["ddp", "explicit"])
def test_a_three_times_slower_gpu_rank_measures_three_times_its_compute(tmp_path, gradient_sync):
    times = {}
    for slowdown in (1.0, 3.0):
        result, _ = train(tmp_path, f"{gradient_sync}-{slowdown}", device="cuda", gradient_sync=gradient_sync,
                          slowdown=(slowdown,), lr=0.0)
        times[slowdown] = result.steps.compute_s.iloc[3:].median()   # the first steps warm cuDNN up
        assert result.steps.compute_s.sum() <= result.epochs.epoch_s.iloc[0]   # the sleep is taken, not only counted
    print(f"{gradient_sync}: median compute {times[1.0] * 1e3:.2f} ms, slowed {times[3.0] * 1e3:.2f} ms")
    # This tiny model's step is bound by kernel launches, and a rank that slept launches its next step's kernels
    # more slowly: its own compute reads 2.2-3.3 ms where an unslowed rank's reads 2.2-2.8 ms, so the ratio came out
    # 2.7-4.4 on an H100. An unslept or doubly counted slowdown would give about 1 or 9.
    assert 2.0 < times[3.0] / times[1.0] < 6.0


def test_sync_batch_norm_in_fp16_learns_on_a_gpu(tmp_path):
    result, _ = train(tmp_path, "syncbn", device="cuda", norm="batch", sync_bn=True, precision="fp16",
                      epochs=3, train_samples=2048, initial_batch=64, lr=0.05)
    accuracy = result.epochs.test_acc.iloc[-1]
    print(f"SyncBatchNorm + fp16 test accuracy: {accuracy:.3f}")
    assert accuracy > 0.5   # chance is 0.1
