"""What a notebook cell calls around its runs: the repo root and the notebook's folders, the RunConfig of each run
with the notebook's overrides, run names with their seeds, its figures, and the <notebook>__summary.json that the
tests and REPORT.md read.

    nb = setup_notebook("2gpu", output_dir="runs/notebook-figures", runs_dir="runs/notebooks", loader_workers=0,
                        named_seeds=seeds[1:])          # the first seed's runs keep their plain names
    results[label, seed] = run(nb.config("static", seed=seed, schedule="static", initial_batch=64))
    nb.figure("accuracy_vs_time", fig, epochs, title)  # PNG + CSV, shown inline, recorded for the summary
    nb.attach_findings({"accuracy_vs_time": sentences})
    write_summary(nb, runs=results)                     # {(label, seed): RunResult} -> "static", "static seed 1"

Run names: a run is `label` at `seed`, maybe under a `variant` (adaptive's "slow" runs, with one slow rank). Its
summary key is "<label>[ <variant>][ seed <seed>]" and its folder "<label>[-<variant>][-seed<seed>]" with spaces as
`folder_space`, where the seed is named only for seeds in `named_seeds` ("static 16 seed 0", static-16-seed0).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..config import RunConfig
from ..records import RunResult, write_json
from ..records import git_commit


def find_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The dynbatch checkout: the first folder at or above `start` (default: cwd) holding pyproject.toml and
    dynbatch_core/, else the folder above this package (an editable install)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "dynbatch_core").is_dir():
            return folder
    return Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class NotebookSetup:
    notebook: str             # e.g. "4gpu": the prefix of every figure and of the summary file
    repo: Path                # the checkout; relative paths in parameters are relative to it
    runs_dir: Path            # run folders: <runs_dir>/<run_folder(label, seed)>
    output_dir: Path          # figures, their CSVs, <notebook>__summary.json
    data_dir: str | None      # resolved data folder (None: $DYNBATCH_DATA or the embedded subset)
    overrides: dict           # RunConfig fields applied to every run of the notebook (loader_workers, config_overrides)
    named_seeds: frozenset = frozenset()   # seeds that run names carry; other seeds' runs are named by label alone
    folder_space: str = "-"   # what a space in a run label becomes in its folder name
    figures: dict = dataclasses.field(default_factory=dict)   # figure name -> {"title", "paths", "findings"}

    def run_key(self, label: str, seed: int | None = None, variant: str | None = None) -> str:
        """The run's name in the summary and in REPORT.md: "static 16 seed 0", "goodput slow seed 0", "static"."""
        name = label if variant is None else f"{label} {variant}"
        return name if seed not in self.named_seeds else f"{name} seed {seed}"

    def run_folder(self, label: str, seed: int | None = None, variant: str | None = None) -> str:
        """The run's folder name under runs_dir: "static-16-seed0", "goodput-slow-seed0", "equal", "dbs_k=2"."""
        name = (label if variant is None else f"{label} {variant}").replace(" ", self.folder_space)
        return name if seed not in self.named_seeds else f"{name}-seed{seed}"

    def config(self, label: str, *, variant: str | None = None, **fields) -> RunConfig:
        """The RunConfig of run `label` (at fields["seed"], under `variant`): `fields`, then the overrides; its
        folder <runs_dir>/<run_folder(...)>, overwritten."""
        folder = self.run_folder(label, fields.get("seed"), variant)
        values = {"data_dir": self.data_dir, "progress": True, **fields, **self.overrides,
                  "out": str(self.runs_dir / folder), "overwrite": True}
        return RunConfig.from_dict(values)

    def figure_name(self, figure: str) -> str:
        return f"{self.notebook}__{figure}"

    def figure(self, name: str, fig, data, title: str, findings: Sequence[str] = ()) -> None:
        """Save `fig` as <output_dir>/<notebook>__<name>.png with `data` beside it as .csv (plots.save_figure),
        show it inline, and record it for write_summary as {"title", "paths", "findings"} (attach_findings: later)."""
        import matplotlib.pyplot as plt   # here, not at the top: the CLI imports this module (through report)
        from .plots import save_figure    # and needs no plotting stack to start

        paths = save_figure(fig, self.figure_name(name), data, self.output_dir)
        self.figures[name] = {"title": title, "paths": paths, "findings": list(findings)}
        plt.show()

    def attach_findings(self, findings: Mapping[str, Sequence[str]]) -> None:
        """Give each named figure its sentences (REPORT.md prints them under the figure)."""
        for name, sentences in findings.items():
            self.figures[name]["findings"] = list(sentences)

    def findings_markdown(self) -> str:
        """Every figure's title in bold and its sentences, one paragraph per figure (for IPython's Markdown)."""
        return "\n\n".join(f"**{figure['title']}.** " + " ".join(figure["findings"])
                           for figure in self.figures.values())


def setup_notebook(notebook: str, *, output_dir: str, runs_dir: str, data_dir: str | None = None,
                   loader_workers: int | None = None, config_overrides: Mapping | None = None,
                   named_seeds: Sequence[int] = (), folder_space: str = "-") -> NotebookSetup:
    """Resolve the notebook's folders against the repo root (so papermill from anywhere and JupyterLab in
    notebooks/ agree) and create them. loader_workers, then config_overrides: RunConfig fields of every run.
    named_seeds, folder_space: how runs are named (NotebookSetup.run_key, run_folder).
    """
    repo = find_repo_root()

    def resolve(path: str) -> Path:  # relative to the repo root; an absolute path stays as it is
        return (repo / Path(path).expanduser()).resolve()

    output, runs = resolve(output_dir), resolve(runs_dir) / notebook
    output.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    overrides = {**({} if loader_workers is None else {"loader_workers": loader_workers}), **(config_overrides or {})}
    return NotebookSetup(notebook, repo, runs, output, str(resolve(data_dir)) if data_dir else None, overrides,
                         named_seeds=frozenset(named_seeds), folder_space=folder_space)


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


def write_summary(setup: NotebookSetup, *, runs: Mapping[str | tuple[str, int], RunResult],
                  variants: Mapping[str, Mapping[tuple[str, int], RunResult]] | None = None,
                  figures: Mapping[str, Mapping] | None = None, comparison: Sequence[str] = (),
                  extra: Mapping | None = None) -> dict:
    """Write <output_dir>/<notebook>__summary.json and return the small, nearly deterministic dict to print.

    runs: {label or (label, seed): RunResult}, named by setup.run_key; variants: {variant: such runs} (adaptive's
    {"slow": ...}). figures: {figure: {"paths": save_figure's dict, "title": str, "findings": [sentences]}}; default
    the figures recorded by setup.figure.
    """
    named = {setup.run_key(*(key if isinstance(key, tuple) else (key,))): result for key, result in runs.items()}
    for variant, variant_runs in (variants or {}).items():
        named |= {setup.run_key(label, seed, variant): result for (label, seed), result in variant_runs.items()}
    figures = setup.figures if figures is None else figures
    payload = {"notebook": setup.notebook, "git_commit": git_commit(),
               "runs": {label: run_summary(result) for label, result in named.items()},
               "figures": [{"name": name, "png": Path(fig["paths"]["png"]).name,
                            "csv": Path(fig["paths"]["csv"]).name, "title": fig.get("title", name),
                            "findings": list(fig.get("findings", ()))} for name, fig in figures.items()],
               "comparison": list(comparison), **dict(extra or {})}
    write_json(setup.output_dir / f"{setup.notebook}__summary.json", payload)
    return {label: {"global_batch_per_epoch": summary["global_batch_per_epoch"],
                    "final_test_acc": round(summary["final_test_acc"], 2)}
            for label, summary in payload["runs"].items()}
