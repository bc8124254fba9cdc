"""What a notebook cell calls around its runs: the repo root and the notebook's folders, the RunConfig of each run
with the notebook's overrides, and the <notebook>__summary.json that the tests and REPORT.md read.

    nb = setup_notebook("2gpu", output_dir="runs/notebook-figures", runs_dir="runs/notebooks")
    result = run(nb.config("static", schedule="static", batch_size=64))
    write_summary(nb, runs={"static": result}, figures=figures)
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

from .config import RunConfig
from .metrics import RunResult, write_json


def find_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The dynbatch checkout: the first folder at or above `start` (default: cwd) holding pyproject.toml and
    dynbatch_core/, else the folder above this package (an editable install)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "dynbatch_core").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class NotebookSetup:
    notebook: str             # e.g. "4gpu": the prefix of every figure and of the summary file
    repo: Path                # the checkout; relative paths in parameters are relative to it
    runs_dir: Path            # run folders: <runs_dir>/<label>
    output_dir: Path          # figures, their CSVs, <notebook>__summary.json
    data_dir: str | None      # resolved data folder (None: $DYNBATCH_DATA or the embedded subset)
    overrides: dict           # RunConfig fields applied to every run of the notebook (the `config_overrides` param)

    def config(self, label: str, **fields) -> RunConfig:
        """The RunConfig of run `label`: `fields`, then the overrides; its folder <runs_dir>/<label>, overwritten."""
        values = {"data_dir": self.data_dir, "progress": True, **fields, **self.overrides,
                  "out": str(self.runs_dir / label), "overwrite": True}
        return RunConfig.from_dict(values)

    def figure_name(self, figure: str) -> str:
        return f"{self.notebook}__{figure}"


def setup_notebook(notebook: str, *, output_dir: str, runs_dir: str, data_dir: str | None = None,
                   config_overrides: Mapping | None = None) -> NotebookSetup:
    """Resolve the notebook's folders against the repo root (so papermill from anywhere and JupyterLab in
    notebooks/ agree) and create them.
    """
    repo = find_repo_root()

    def resolve(path: str) -> Path:  # relative to the repo root; an absolute path stays as it is
        return (repo / Path(path).expanduser()).resolve()

    output, runs = resolve(output_dir), resolve(runs_dir) / notebook
    output.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    return NotebookSetup(notebook, repo, runs, output, str(resolve(data_dir)) if data_dir else None,
                         dict(config_overrides or {}))


def batch_schedule(result: RunResult) -> list[int]:
    return [int(b) for b in result.epochs["global_batch"]]


def run_summary(result: RunResult) -> dict:
    """The numbers of one run that the tests and REPORT.md use."""
    epochs = result.epochs
    last = epochs.iloc[-1]
    return {"final_test_acc": round(float(last["test_acc"]), 4),
            "best_test_acc": round(float(epochs["test_acc"].max()), 4),
            "final_train_loss": round(float(last["train_loss"]), 4),
            "global_batch_per_epoch": batch_schedule(result),
            "epochs": len(epochs), "steps": int(epochs["steps"].sum()), "wall_s": round(float(last["wall_s"]), 2),
            "samples_per_s_last_epoch": round(float(last["samples_per_s"]), 1),
            "git_commit": result.config.get("resolved", {}).get("git_commit")}


def write_summary(setup: NotebookSetup, *, runs: Mapping[str, RunResult], figures: Mapping[str, Mapping],
                  comparison: Sequence[str] = (), extra: Mapping | None = None) -> dict:
    """Write <output_dir>/<notebook>__summary.json and return the small, nearly deterministic dict to print.

    figures: {figure: {"paths": save_figure's dict, "title": str, "findings": [sentences]}}.
    """
    from .rundir import git_commit
    payload = {"notebook": setup.notebook, "git_commit": git_commit(),
               "runs": {label: run_summary(result) for label, result in runs.items()},
               "figures": [{"name": name, "png": Path(fig["paths"]["png"]).name,
                            "csv": Path(fig["paths"]["csv"]).name, "title": fig.get("title", name),
                            "findings": list(fig.get("findings", ()))} for name, fig in figures.items()],
               "comparison": list(comparison), **dict(extra or {})}
    write_json(setup.output_dir / f"{setup.notebook}__summary.json", payload)
    return {label: {"global_batch_per_epoch": summary["global_batch_per_epoch"],
                    "final_test_acc": round(summary["final_test_acc"], 2)}
            for label, summary in payload["runs"].items()}
