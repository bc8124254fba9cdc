"""check_resume on fabricated run folders (config.json + checkpoints/latest.json): what a resumed run may change."""
import dataclasses
import json

import pytest

from dynbatch_core.config import RunConfig
from dynbatch_core.engine.validation import check_resume

STORED = RunConfig(dataset="synthetic", model="resnet8", world_size=2, schedule="probe", probe_sizes=(16, 32, 64),
                   rank_weights=(3.0, 13.0), device="cpu", epochs=2)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as a 2-rank run leaves it after its checkpoint at step 4 (the checkpoint files are not read)."""
    folder = tmp_path / "run"
    (folder / "checkpoints" / "step-00000004").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(STORED.to_dict()))  # tuples become JSON lists
    (folder / "checkpoints" / "latest.json").write_text(
        json.dumps({"folder": "step-00000004", "step": 4, "world_size": 2}))
    return folder


def resumed(run_dir, **changes):
    return dataclasses.replace(STORED, resume=str(run_dir), **changes)


def test_list_valued_options_equal_to_the_stored_tuples_are_the_same_options(run_dir):
    check_resume(resumed(run_dir, probe_sizes=[16, 32, 64], rank_weights=[3.0, 13.0]))  # as the Python API may pass


def test_a_changed_list_valued_option_is_refused_naming_both_values(run_dir):
    with pytest.raises(ValueError, match=r"--probe-sizes was \(16, 32, 64\) in that run, now \[16, 32\]"):
        check_resume(resumed(run_dir, probe_sizes=[16, 32]))


def test_device_epochs_and_threads_may_change_but_the_learning_rate_may_not(run_dir):
    check_resume(resumed(run_dir, device="cuda", epochs=5, threads=1))  # a CPU checkpoint continues on GPUs
    with pytest.raises(ValueError, match=r"--lr was 0\.05 in that run, now 0\.1; a resumed run may only change "
                                         r"checkpoint_every, checkpoints, data_dir, device, download, epochs"):
        check_resume(resumed(run_dir, lr=0.1))
