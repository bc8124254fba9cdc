"""The Lightning strategy (dynbatch_core/integrations/lightning.py): one run of examples/lightning_loop.py --check
(5 fits of 2 forked CPU ranks, ~10 s) shared by the slow tests; the optimizer-step arithmetic and the refusals
without ranks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynbatch_core.engine.sampler import StepPlan
from dynbatch_core.integrations.lightning_steps import optimizer_step_samples

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


@pytest.fixture(scope="module")
def example_check(tmp_path_factory):
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("lightning_loop")
    completed = subprocess.run([sys.executable, str(REPO / "examples" / "lightning_loop.py"), "--devices", "2",
                                "--check", "--out", str(out)], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    return completed, out


def value_after(text: str, label: str) -> str:
    return text.split(label)[1].split()[0].rstrip(";")


@pytest.mark.slow
def test_uneven_split_with_workers_accumulation_and_clipping_equals_one_process(example_check):
    completed, _ = example_check
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "split [8, 16]" in completed.stdout
    assert float(value_after(completed.stdout, "max |param difference| = ")) <= 1e-5
    # Lightning's validation loop under the strategy: once per epoch, the trained weights' loss
    assert "validation: 2 logged" in completed.stdout
    assert float(value_after(completed.stdout, "differs from one process by ")) <= 1e-5


@pytest.mark.slow
def test_stock_lightning_ddp_on_the_same_split_trains_the_mean_of_rank_means(example_check):
    completed, _ = example_check
    assert float(value_after(completed.stdout, "plain DDP vs mean of rank means = ")) <= 1e-5
    assert float(value_after(completed.stdout, "plain DDP vs dynbatch = ")) > 1e-3   # the weighting matters


@pytest.mark.slow
def test_kill_and_resume_from_a_mid_epoch_checkpoint_is_bit_exact(example_check):
    completed, _ = example_check
    assert "killed after step 4: ProcessExitedException" in completed.stdout
    assert float(value_after(completed.stdout, "resume max |param difference| = ")) == 0.0
    assert "resume batch sizes equal: True" in completed.stdout
    assert "(24, 24)" in completed.stdout and "(34, 14)" in completed.stdout   # pid moved the split


@pytest.mark.slow
def test_csv_logger_holds_the_planned_per_rank_batches_of_every_optimizer_step(example_check):
    from lightning_loop import logged_rank_batches
    _, out = example_check
    # 241 samples, B = 24, 2 batches per optimizer step: 5 steps of [2 x 8, 2 x 16], then the 1-sample step
    # whose split of [8, 16] by largest remainder is [0, 1] (rank 0's slice is empty)
    epoch = [[16, 32]] * 5 + [[0, 1]]
    assert logged_rank_batches(out, "exact") == list(enumerate(epoch + epoch))


def plan(step: int, offset: int, global_batch: int) -> StepPlan:
    return StepPlan([], epoch=0, step=step, offset=offset, rank_batches=[global_batch, 0])


def test_an_optimizer_step_holds_all_its_batches_and_the_epochs_last_is_short():
    # 241 samples, B = 24: steps 0-9 full, step 10 holds 1 sample
    assert optimizer_step_samples(plan(0, 0, 24), 24, 241, 2) == 48
    assert optimizer_step_samples(plan(3, 72, 24), 24, 241, 2) == 48
    assert optimizer_step_samples(plan(10, 240, 1), 24, 241, 2) == 1
    assert optimizer_step_samples(plan(9, 216, 24), 24, 241, 3) == 24 + 1   # steps 9, 10 (11 does not exist)
    assert optimizer_step_samples(plan(4, 96, 24), 24, 241, 1) == 24


def test_refusals_are_one_line_and_come_before_any_rank():
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    from dynbatch_core.batching.schedules import build_schedule
    from dynbatch_core.integrations.lightning import DynamicBatchesStrategy
    from lightning_loop import BlobsData, Classifier

    with pytest.raises(ValueError, match="leave out ddp_comm_hook"):
        DynamicBatchesStrategy(global_batch=24, ddp_comm_hook=lambda state, bucket: None)
    with pytest.raises(ValueError, match="leave out broadcast_buffers"):
        DynamicBatchesStrategy(global_batch=24, broadcast_buffers=True)
    with pytest.raises(ValueError, match="B fixed within an epoch"):
        DynamicBatchesStrategy(global_batch=build_schedule("goodput", initial_batch=24, max_batch=96))

    class Manual(Classifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    def fit(model, **trainer_options):
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DynamicBatchesStrategy(global_batch=24),
                             logger=False, enable_progress_bar=False, enable_checkpointing=False, **trainer_options)
        trainer.fit(model, BlobsData())

    with pytest.raises(ValueError, match="automatic optimization only") as manual:
        fit(Manual())
    with pytest.raises(ValueError, match="limit_train_batches") as limited:
        fit(Classifier(), limit_train_batches=0.5)
    assert "\n" not in str(manual.value) + str(limited.value)
    assert torch.distributed.is_initialized() is False   # nothing was launched
