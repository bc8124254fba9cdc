"""study/notebook.py: run names with their seeds (the folders and summary keys the notebooks have always written),
the config of a run, and a figure recorded with its findings into the summary JSON."""
import json
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from dynbatch_core.records import RunResult
from dynbatch_core.study.notebook import setup_notebook, write_summary

matplotlib.use("Agg")


@pytest.fixture
def folders(tmp_path):
    return {"output_dir": str(tmp_path / "figures"), "runs_dir": str(tmp_path / "runs")}


def test_adaptive_names_every_run_with_its_seed_and_a_variant_after_the_label(folders):
    nb = setup_notebook("adaptive", **folders, named_seeds=[0, 1])
    assert [nb.run_folder("static 16", 0), nb.run_folder("goodput adascale", 1), nb.run_folder("goodput-cpu", 0),
            nb.run_folder("goodput", 0, "slow"), nb.run_folder("static 16", 0, "slow")] == \
        ["static-16-seed0", "goodput-adascale-seed1", "goodput-cpu-seed0", "goodput-slow-seed0",
         "static-16-slow-seed0"]
    assert [nb.run_key("static 16", 0), nb.run_key("goodput-cpu", 0), nb.run_key("goodput", 0, "slow")] == \
        ["static 16 seed 0", "goodput-cpu seed 0", "goodput slow seed 0"]


def test_heterogeneous_names_the_first_seeds_runs_by_label_alone_and_its_sweep_folders_with_underscores(folders):
    nb = setup_notebook("heterogeneous", **folders, named_seeds=[1, 2], folder_space="_")
    assert [nb.run_folder("equal", 0), nb.run_folder("equal", 1), nb.run_folder("dbs k=2", 0)] == \
        ["equal", "equal-seed1", "dbs_k=2"]
    assert [nb.run_key("equal", 0), nb.run_key("equal", 2), nb.run_key("dbs k=2")] == ["equal", "equal seed 2",
                                                                                        "dbs k=2"]


def test_a_runs_config_takes_the_notebooks_overrides_last_and_its_folder_from_label_and_seed(folders):
    nb = setup_notebook("2gpu", **folders, loader_workers=2, config_overrides={"epochs": 3}, named_seeds=[1])
    config = nb.config("loss-plateau", seed=1, schedule="loss-plateau", epochs=9, initial_batch=32)
    assert config.out == str(Path(folders["runs_dir"]).resolve() / "2gpu" / "loss-plateau-seed1")
    assert (config.loader_workers, config.epochs, config.initial_batch, config.overwrite) == (2, 3, 32, True)
    assert setup_notebook("2gpu", **folders, config_overrides={"loader_workers": 1}, loader_workers=2
                          ).config("static").loader_workers == 1   # config_overrides win, as before
    assert setup_notebook("2gpu", **folders).overrides == {}


def _result(batches, accuracy):
    epochs = pd.DataFrame({"epoch": range(len(batches)), "global_batch": batches, "test_acc": accuracy,
                           "train_loss": 1.0, "steps": 4, "wall_s": [1.0 + i for i in range(len(batches))],
                           "samples_per_s": 100.0})
    return RunResult(Path("unused"), {}, pd.DataFrame(), epochs)


def test_a_recorded_figure_and_its_findings_reach_the_summary_under_the_runs_names(folders):
    import matplotlib.pyplot as plt
    nb = setup_notebook("adaptive", **folders, named_seeds=[0])
    data = pd.DataFrame({"x": [1, 2]})
    fig, _ = plt.subplots()
    nb.figure("race", fig, data, "The race")
    nb.attach_findings({"race": ["One.", "Two."]})
    assert nb.findings_markdown() == "**The race.** One. Two."
    written = write_summary(nb, runs={("static 16", 0): _result([16, 16], [0.5, 0.61]),
                                      ("goodput-cpu", 0): _result([32], [0.7])},
                            variants={"slow": {("goodput", 0): _result([64], [0.4])}}, extra={"target": 0.3})
    assert written == {"static 16 seed 0": {"global_batch_per_epoch": [16, 16], "final_test_acc": 0.61},
                       "goodput-cpu seed 0": {"global_batch_per_epoch": [32], "final_test_acc": 0.7},
                       "goodput slow seed 0": {"global_batch_per_epoch": [64], "final_test_acc": 0.4}}
    summary = json.loads((Path(folders["output_dir"]) / "adaptive__summary.json").read_text())
    assert summary["figures"] == [{"name": "race", "png": "adaptive__race.png", "csv": "adaptive__race.csv",
                                   "title": "The race", "findings": ["One.", "Two."]}]
    assert pd.read_csv(Path(folders["output_dir"]) / "adaptive__race.csv").equals(data)
    assert summary["target"] == 0.3
