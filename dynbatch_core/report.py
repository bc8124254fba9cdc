"""The report: run every notebook with papermill, keep each figure (PNG + CSV), and write outputs/REPORT.md.

    python -m dynbatch_core report                    # the `report` parameter set (CPU, ~40 min on 2 cores)
    python -m dynbatch_core report --params defaults  # the notebooks' own small defaults (a minute or two each)
    python -m dynbatch_core report --notebooks 4gpu   # re-run one notebook; REPORT.md still covers all of them
    python -m dynbatch_core report --no-execute       # only rewrite REPORT.md from what outputs/ holds

Parameter sets are YAML files next to the notebooks (notebooks/params/<set>/<notebook>.yaml, papermill's `-f`);
`output_dir` is injected so that figures land in <out>/figures, while a notebook run by hand or by nbval keeps its
default scratch folder (runs/notebook-figures). Executed notebooks go to <out>/notebooks.

The notebooks use the helpers at the top of this file: `setup_notebook` (repo root, run folders, RunConfig with
the notebook's overrides), `write_summary` (the <notebook>__summary.json that the tests and REPORT.md read), and
the `describe_*` functions, which turn results into the sentences printed in the notebook and copied to REPORT.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from .config import RunConfig
from .metrics import RunResult, write_atomic, write_json

NOTEBOOKS = ("1gpu_mnist", "1gpu_cifar10", "2gpu", "4gpu", "heterogeneous", "adaptive")
PARAMETER_SETS = ("report", "full", "defaults")
CLASS_STUDY = ("the class study (full datasets, ResNet-18/101 on GPUs) saw an accuracy dip on 1 GPU when the probe "
               "schedule dropped the batch back to 16, and on 4 GPUs found the decreasing and loss-based schedules "
               "fastest")
DIP_POINTS = 0.2  # a drop in test accuracy of at least this many percentage points counts as a dip


# ---------------------------------------------------------------------------------------------------------------
# helpers for the notebooks


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


# ---------------------------------------------------------------------------------------------------------------
# sentences from numbers (shown in the notebooks, copied into REPORT.md)


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def _batches(values: Sequence[int]) -> str:
    """[16, 16, 32] -> '16 → 16 → 32'."""
    return " → ".join(str(int(v)) for v in values)


def _names(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def probe_outcome(epochs: pd.DataFrame, probe_sizes: Sequence[int]) -> dict:
    """What the probe did: the chosen batch, the test accuracy of the last probe epoch (acc_before) and of every
    epoch at the chosen batch (acc_after), and dip_points = how many percentage points the lowest of those fell
    below acc_before (negative: it never fell)."""
    probes = min(len(probe_sizes), len(epochs))
    outcome = {"probe_epochs": probes, "chosen_batch": None, "dropped": False, "dip_points": None}
    if len(epochs) > probes:
        before, after = epochs.iloc[probes - 1], epochs.iloc[probes:]
        outcome.update(chosen_batch=int(after["global_batch"].iloc[0]),
                       dropped=bool(after["global_batch"].iloc[0] < before["global_batch"]),
                       acc_before=round(float(before["test_acc"]), 4),
                       acc_after=[round(float(acc), 4) for acc in after["test_acc"]],
                       dip_points=round(100 * (before["test_acc"] - after["test_acc"].min()), 2))
    return outcome


def describe_probe(epochs: pd.DataFrame, probe_sizes: Sequence[int]) -> tuple[list[str], list[str]]:
    """(findings, comparison with the class study) for one probe run's epochs table."""
    outcome = probe_outcome(epochs, probe_sizes)
    probes = outcome["probe_epochs"]
    probe_part = epochs.iloc[:probes]
    first, last = epochs.iloc[0], epochs.iloc[-1]
    findings = [f"The probe ran one epoch at each global batch {_batches(probe_part['global_batch'])} "
                f"({_seconds(probe_part['wall_s'].iloc[-1])} of training)"
                + (f", then kept B = {outcome['chosen_batch']} for the remaining {len(epochs) - probes} epoch(s)."
                   if outcome["chosen_batch"] else "; the run ended before it chose a batch."),
                f"Test accuracy went from {first['test_acc']:.3f} after the first epoch to {last['test_acc']:.3f} "
                f"after {len(epochs)} epochs and {_seconds(last['wall_s'])} of training."]
    if outcome["chosen_batch"] is None:
        return findings, []
    from .schedules import EpochSummary, ProbeSchedule
    rates = ProbeSchedule.rates([EpochSummary(int(row.epoch), int(row.global_batch), float(row.train_loss),
                                              float(row.epoch_s)) for row in probe_part.itertuples()])
    findings.append("Its rule, the fastest fall of ln(training loss) per second of epoch, scored them "
                    + ", ".join(f"{int(b)}: {1000 * r:.2f}" for b, r in zip(probe_part["global_batch"], rates))
                    + " (per 1000 s)" + ("; the first probe's score includes the steep start of training."
                                         if rates and max(rates) == rates[0] else "."))
    path = " → ".join(f"{acc:.3f}" for acc in [outcome["acc_before"], *outcome["acc_after"]])
    dipped = outcome["dip_points"] >= DIP_POINTS
    verdict = (f"a dip of {outcome['dip_points']:.1f} points" if dipped else
               f"no dip (never more than {DIP_POINTS} points below {outcome['acc_before']:.3f})")
    if outcome["dropped"]:
        findings.append(f"When the batch dropped from {int(probe_part['global_batch'].iloc[-1])} back to "
                        f"{outcome['chosen_batch']}, test accuracy went {path} over the epochs that followed: "
                        f"{verdict}.")
        comparison = [("Like" if dipped else "Unlike") + " the class study's 1-GPU probe, which dipped when the "
                      f"batch dropped back to 16: here the probe chose {outcome['chosen_batch']} and test accuracy "
                      f"went {path} after the drop ({verdict})."]
    else:
        findings.append(f"The chosen batch is not smaller than the last probe's, so there was no drop back to a "
                        f"small batch; test accuracy went {path} from the last probe epoch on.")
        comparison = [f"The class study's dip came with the drop back to B = 16; here the probe chose "
                      f"{outcome['chosen_batch']}, so that situation did not arise."]
    return findings, comparison


def timing_noise(epochs: pd.DataFrame, threshold: float = 1.2) -> tuple[float, str | None]:
    """(spread, sentence): the largest ratio of median samples/s between runs at a global batch every run used
    (1.0 when none is shared), and a sentence about it when it exceeds `threshold`."""
    medians = epochs.groupby(["global_batch", "run"])["samples_per_s"].median().unstack("run")
    shared = medians.dropna()  # batches every run used
    if epochs["run"].nunique() < 2 or shared.empty:
        return 1.0, None
    spreads = shared.max(axis=1) / shared.min(axis=1)
    batch = spreads.idxmax()
    spread = float(spreads[batch])
    if spread <= threshold:
        return spread, None
    row = shared.loc[batch]
    return spread, (f"Timing noise: at B = {batch}, which every run used, the runs' median throughput ranged from "
                    f"{row.min():.0f} ({row.idxmin()}) to {row.max():.0f} samples/s ({row.idxmax()}): other work "
                    f"shared the CPU, so time ratios between runs below about {spread:.1f}× are within this noise.")


def describe_accuracy_race(epochs: pd.DataFrame, *, noise: bool = True) -> list[str]:
    """Final accuracies and the time each run needed to reach the lowest of them; noise: add `timing_noise`'s
    sentence (only meaningful when runs with the same global batch should run equally fast)."""
    from .plots import time_to_reach
    finals = epochs.groupby("run", sort=False).tail(1).set_index("run")
    findings = ["Global batch per epoch: " + "; ".join(
        f"{run} {_batches(epochs.loc[epochs['run'] == run, 'global_batch'])}" for run in finals.index) + "."]
    findings.append("Final test accuracy: " + ", ".join(
        f"{run} {row.test_acc:.3f} after {_seconds(row.wall_s)}" for run, row in finals.iterrows()) + ".")
    if len(finals) > 1:
        target = float(finals["test_acc"].min())
        reach = time_to_reach(epochs, "test_acc", target, lower_is_better=False).sort_values("time_s")
        findings.append(f"To reach {target:.3f} (the lowest final accuracy) took " + ", ".join(
            f"{row.run} {_seconds(row.time_s)}" for row in reach.itertuples()) +
            f": {reach['run'].iloc[0]} was {reach['time_s'].iloc[-1] / reach['time_s'].iloc[0]:.2f}× faster "
            f"than {reach['run'].iloc[-1]}.")
    sentence = timing_noise(epochs)[1] if noise else None
    return findings + ([sentence] if sentence else [])


def describe_schedule_race(epochs: pd.DataFrame, *, expected_fastest: Sequence[str] = ("decreasing", "loss-plateau")
                           ) -> tuple[list[str], list[str], float]:
    """(findings, comparison, target loss): time to reach the highest final training loss, and why.

    Time to a loss = samples needed / samples per second, so the sentence says which of the two decided it.
    """
    from .plots import time_to_reach
    finals = epochs.groupby("run", sort=False).tail(1).set_index("run")
    target = float(finals["train_loss"].max())
    reach = time_to_reach(epochs, "train_loss", target, lower_is_better=True).sort_values("time_s")
    reach["rate"] = reach["samples"] / reach["time_s"]
    fastest, slowest = reach.iloc[0], reach.iloc[-1]
    findings = [f"Time to reach training loss {target:.3g} (the highest final loss, so every run reaches it): "
                + ", ".join(f"{row.run} {_seconds(row.time_s)}" for row in reach.itertuples()) + ".",
                "Global batch per epoch: " + "; ".join(
                    f"{run} {_batches(epochs.loc[epochs['run'] == run, 'global_batch'])}" for run in finals.index)
                + "."]
    sample_ratio = slowest.samples / fastest.samples
    rate_ratio = fastest.rate / slowest.rate
    reason = "fewer samples" if sample_ratio >= rate_ratio else "faster processing of samples"
    findings.append(f"{fastest.run} beat {slowest.run} by {slowest.time_s / fastest.time_s:.2f}×: it needed "
                    f"{fastest.samples:.0f} samples instead of {slowest.samples:.0f} ({sample_ratio:.2f}×) at "
                    f"{fastest.rate:.0f} instead of {slowest.rate:.0f} samples/s ({rate_ratio:.2f}×), so mostly "
                    f"{reason}.")
    by_batch = epochs.groupby("global_batch")["samples_per_s"].median()
    if len(by_batch) > 1:
        small, large = by_batch.iloc[0], by_batch.iloc[-1]
        throughput = (f"median {small:.0f} samples/s at B = {by_batch.index[0]} vs {large:.0f} at "
                      f"B = {by_batch.index[-1]}")
        if large > 1.2 * small:
            findings.append(f"Large batches are faster per sample here ({throughput}): a schedule that spends its "
                            "early epochs, where the loss falls fastest, at large batches gains time there; one "
                            "that starts small pays for it, unless its extra updates per sample make up for it.")
        else:
            findings.append(f"Large batches are hardly faster per sample here ({throughput}), so the schedules "
                            "differ mainly in how much the loss falls per sample, where smaller batches (more "
                            "updates) tend to win early in training.")
    spread, noise = timing_noise(epochs)
    if noise:
        findings.append(noise)
    by_samples = reach.sort_values("samples")
    findings.append("Samples needed to reach it (not affected by timing noise): " + ", ".join(
        f"{row.run} {row.samples:.0f}" for row in by_samples.itertuples()) + ".")
    time_ratio = slowest.time_s / fastest.time_s
    if time_ratio <= spread:
        two_first = list(by_samples["run"].iloc[:2])
        agree = set(two_first) == set(expected_fastest)
        comparison = [f"This run cannot rank the schedules by time: all reached the target within {time_ratio:.2f}× "
                      f"of each other, inside the {spread:.1f}× timing noise. By samples needed, the two most "
                      f"efficient were {_names(two_first)}, " + ("the same two the class study found fastest."
                      if agree else f"not the class study's two fastest ({_names(expected_fastest)}).")]
    else:
        two_first = list(reach["run"].iloc[:2])
        agree = set(two_first) == set(expected_fastest)
        comparison = [f"{'As in' if agree else 'Unlike'} the class study (4 GPUs: {_names(expected_fastest)} "
                      f"fastest), the two fastest here were {_names(two_first)}; {fastest.run} won mostly through "
                      f"{reason}."]
    if not agree:
        gain = (f" (here B = {by_batch.index[-1]} ran only {by_batch.iloc[-1] / by_batch.iloc[0]:.1f}× faster per "
                f"sample than B = {by_batch.index[0]})" if len(by_batch) > 1 else "")
        comparison.append("Two likely reasons for the difference: on GPUs a large batch is far cheaper per sample than on these CPU "
                          f"ranks{gain}, which favours starting large; and the class study's loss-based rule, as "
                          "its seed computed P (without the 1/k, see schedules.LossPlateauSchedule), never saw a "
                          "plateau and only ever halved B, so it behaved like decreasing.")
    return findings, comparison, target


def last_full_split(steps: pd.DataFrame) -> dict[str, list[int]]:
    """Per run: the per-rank batches of the last step of the last epoch that held the full global batch."""
    splits = {}
    for run, part in steps.groupby("run", sort=False):
        part = part[part["epoch"] == part["epoch"].max()]
        full = part[part["global_batch"] == part["global_batch"].max()]
        last_step = full[full["step"] == full["step"].max()].sort_values("rank")
        splits[run] = [int(b) for b in last_step["rank_batch"]]
    return splits


def describe_balancing(steps: pd.DataFrame, speedups: pd.DataFrame, slowdown: Sequence[float],
                       emulated_sample_ms: float | None = None) -> dict[str, list[str]]:
    """Sentences for the heterogeneous notebook's rank_batches, balance_efficiency and speedup figures."""
    from .balance_metrics import ceiling_speedup
    from .plots import efficiency_table
    speeds = [1.0 / k for k in slowdown]
    ideal = [round(s / sum(speeds), 2) for s in speeds]
    splits = [f"{run} {split}" for run, split in last_full_split(steps).items()]
    efficiency = efficiency_table(steps)
    last_epoch = efficiency[efficiency["epoch"] == efficiency.groupby("run")["epoch"].transform("max")]
    mean_eff = last_epoch.groupby("run", sort=False)["efficiency"].mean()
    equal_eff = sum(slowdown) / (len(slowdown) * max(slowdown))
    balanced = speedups[speedups["balancer"] != "equal"]
    at_main = balanced[balanced["slowest"] == max(slowdown)]
    speedup = [f"At slowdown {list(slowdown)} the ceiling is {ceiling_speedup(slowdown):.2f}×; measured on the last "
               "epoch: " + ", ".join(f"{row.balancer} {row.speedup:.2f}× ({100 * row.speedup / row.ceiling:.0f} % "
                                     "of it)" for row in at_main.itertuples()) + "."]
    swept = balanced[balanced["slowest"] > 1]
    if swept["slowest"].nunique() > 1:
        share = (swept["speedup"] / swept["ceiling"]).groupby(swept["balancer"], sort=False).mean()
        speedup.append(f"Over k = {', '.join(f'{k:g}' for k in sorted(swept['slowest'].unique()))} they reached on "
                       "average " + ", ".join(f"{name} {100 * value:.0f} %" for name, value in share.items())
                       + " of the ceiling.")
    if emulated_sample_ms:
        speedup.append(f"Compute was emulated at {emulated_sample_ms:g} ms per sample × k (emulated_sample_ms), so "
                       "the cost per sample is fixed and other work on this shared CPU cannot decide the comparison; "
                       "data loading, all-reduce and optimizer steps are real and keep results a little below the "
                       "ceiling.")
    else:
        speedup.append("Compute was real: on a CPU the cost per sample falls with the batch, so the fast rank's "
                       "larger slice can take a balancer past the ceiling, and other work on the machine adds noise.")
    return {
        "rank_batches": [f"With slowdown {list(slowdown)}, the speed-proportional shares are {ideal}; the split at the "
                         "last full step was " + ", ".join(splits) + ". DBS re-splits once per epoch (its first "
                         "epoch is equal), PID every few steps."],
        "balance_efficiency": ["Mean balance efficiency in the last epoch: " + ", ".join(
            f"{run} {value:.2f}" for run, value in mean_eff.items()) +
            f" (an equal split of these slowdowns gives {equal_eff:.2f} in theory, a perfect split 1)."],
        "speedup": speedup,
    }


def describe_fit(steps: pd.DataFrame) -> list[str]:
    """Sentences for the fitted-step-time figure: how closely the model balancer's lines predict each rank."""
    from .plots import fitted_step_time_table
    table = fitted_step_time_table(steps)
    if table.empty:
        return ["No run used the model balancer."]
    last = table[table["step"] == table["step"].max()].sort_values("rank")
    lines = ", ".join(f"rank {row.rank}: {1000 * row.model_a_s:.1f} ms + {1000 * row.model_c_s:.2f} ms × b"
                      for row in last.itertuples())
    later = table[table["step"] >= table["step"].max() // 2]
    error = ((later["compute_s"] - later["fitted_s"]).abs() / later["compute_s"].clip(lower=1e-9)).median()
    return [f"Final fitted lines {lines}. Over the second half of the run the fitted time was off the measured one "
            f"by a median {100 * error:.1f} % per step."]


def strip_outputs(paths: Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """Clear outputs and execution counts of the notebooks (default: notebooks/*.ipynb) before a commit, except
    cells marked `# NBVAL_CHECK_OUTPUT`, whose stored output nbval compares. Returns the files it changed."""
    import nbformat
    paths = [Path(p) for p in paths] if paths else sorted((find_repo_root() / "notebooks").glob("*.ipynb"))
    changed = []
    for path in paths:
        notebook = nbformat.read(str(path), as_version=4)
        before = nbformat.writes(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code" and "NBVAL_CHECK_OUTPUT" not in cell.source:
                cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
            cell.metadata.pop("papermill", None)
        if nbformat.writes(notebook) != before:
            write_atomic(path, lambda tmp: nbformat.write(notebook, tmp))
            changed.append(path)
    return changed


# ---------------------------------------------------------------------------------------------------------------
# the report command


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add `report` to the CLI's subcommands (cli.build_parser)."""
    parser = subparsers.add_parser(
        "report", help="execute every notebook with papermill; write figures, CSVs and REPORT.md",
        description="Execute the notebooks with a parameter set and write <out>/notebooks/*.ipynb, "
                    "<out>/figures/<notebook>__<figure>.png/.csv and <out>/REPORT.md.")
    parser.add_argument("--params", choices=PARAMETER_SETS, default="report",
                        help="parameter set: notebooks/params/<set>/<notebook>.yaml, or the notebooks' defaults "
                             "(default: report)")
    parser.add_argument("--notebooks", nargs="+", choices=NOTEBOOKS, default=list(NOTEBOOKS), metavar="NAME",
                        help=f"which notebooks to execute (default: all of {', '.join(NOTEBOOKS)})")
    parser.add_argument("--out", default="outputs", help="output folder, relative to the repo root (default: outputs)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with mnist.npz / cifar10.npz (or torchvision's files) for every notebook; "
                             "default: $DYNBATCH_DATA, else the small embedded subsets")
    parser.add_argument("--download", action="store_true",
                        help="let every notebook download its dataset with torchvision (needs internet)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    parser.add_argument("--no-execute", action="store_true", help="only rewrite REPORT.md from <out>")
    return parser


def load_parameters(repo: Path, notebook: str, parameter_set: str) -> dict:
    if parameter_set == "defaults":
        return {}
    import yaml
    path = repo / "notebooks" / "params" / parameter_set / f"{notebook}.yaml"
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of parameter names to values")
    return values


def execute_notebook(repo: Path, notebook: str, parameter_set: str, out: Path, kernel: str = "python3",
                     parameters: Mapping | None = None) -> float:
    """Run one notebook with papermill (cwd = repo root) into <out>/notebooks, figures into <out>/figures;
    `parameters` go on top of the set's. Returns its seconds."""
    import nbformat
    import papermill
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    parameters = {**load_parameters(repo, notebook, parameter_set), **dict(parameters or {}),
                  "output_dir": str(out / "figures")}
    target = out / "notebooks" / f"{notebook}.ipynb"
    started = time.perf_counter()
    try:
        executed = papermill.execute_notebook(str(repo / "notebooks" / f"{notebook}.ipynb"), str(target),
                                              parameters=parameters, kernel_name=kernel, cwd=str(repo),
                                              progress_bar=False)
    finally:
        seconds = time.perf_counter() - started
    executed = nbformat.read(str(target), as_version=4)
    executed.metadata.pop("widgets", None)   # the progress widgets' state: emptied displays, nothing to show
    executed.metadata["dynbatch"] = {"parameter_set": parameter_set, "seconds": round(seconds, 1)}
    write_atomic(target, lambda tmp: nbformat.write(executed, tmp))
    return seconds


def main_report(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    repo = find_repo_root()
    out = (repo / args.out).resolve()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}   # notebook -> the last line of its error
    if not args.no_execute:
        bar = tqdm(args.notebooks, desc=f"report ({args.params})", unit="notebook", file=sys.stderr)
        for notebook in bar:
            bar.set_postfix_str(notebook)
            try:
                seconds = execute_notebook(repo, notebook, args.params, out, args.kernel,
                                           parameters=data_parameters(args, repo, notebook))
                bar.write(f"[dynbatch] {notebook}: {seconds:.0f} s -> {out / 'notebooks' / (notebook + '.ipynb')}")
            except Exception as error:  # papermill's PapermillExecutionError, a missing kernel, bad YAML ...
                last_line = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
                failed[notebook] = last_line
                bar.write(f"[dynbatch] {notebook} FAILED: {last_line}")
    report_path = write_report(repo, out, failed)
    print(report_path)
    return 1 if failed else 0


def data_parameters(args: argparse.Namespace, repo: Path, notebook: str) -> dict:
    """--data-dir and --download as notebook parameters (absolute, so the notebooks' cwd does not matter)."""
    parameters = {}
    if args.data_dir is not None:
        parameters["data_dir"] = str(Path(args.data_dir).expanduser().resolve())
    if args.download:
        overrides = load_parameters(repo, notebook, args.params).get("config_overrides") or {}
        parameters["config_overrides"] = {**overrides, "download": True}
    return parameters


def write_report(repo: Path, out: Path, failed: dict[str, str] | Sequence[str] = ()) -> Path:
    """<out>/REPORT.md from <out>/figures/*__summary.json and the executed notebooks' metadata. `failed`: the
    notebooks that failed, with their error lines (a dict) or without (a list); each is named, with its error, at
    the top of the report, where no reader can miss it."""
    failed = dict(failed) if isinstance(failed, dict) else {notebook: "" for notebook in failed}
    import nbformat
    from .rundir import git_commit
    sections, comparisons, total_s, parameter_sets = [], [], 0.0, set()
    commit, done = git_commit() or "unknown", 0
    for notebook in NOTEBOOKS:
        summary_path = out / "figures" / f"{notebook}__summary.json"
        executed_path = out / "notebooks" / f"{notebook}.ipynb"
        if notebook in failed or not summary_path.exists() or not executed_path.exists():
            state = "failed" if notebook in failed else "not run"
            reason = f": `{failed[notebook]}`" if failed.get(notebook) else ""
            sections.append(f"## {notebook}\n\n*{state}*{reason} — see `{executed_path.relative_to(out)}`.\n")
            continue
        done += 1
        summary = json.loads(summary_path.read_text())
        executed = nbformat.read(str(executed_path), as_version=4)
        meta = executed.metadata.get("dynbatch", {})
        total_s += meta.get("seconds", 0.0)
        parameter_set = meta.get("parameter_set", "?")
        parameter_sets.add(parameter_set)
        source = ("the notebook's defaults" if parameter_set == "defaults" else
                  f"`notebooks/params/{parameter_set}/{notebook}.yaml`")
        lines = [f"## {notebook}\n",
                 f"Executed copy [`notebooks/{notebook}.ipynb`](notebooks/{notebook}.ipynb) of the repository's "
                 f"`notebooks/{notebook}.ipynb` ({meta.get('seconds', float('nan')) / 60:.1f} min), parameters "
                 f"from {source}, git commit `{summary.get('git_commit')}`.\n",
                 f"Parameters: {_parameter_line(repo, notebook, executed)}.\n"]
        for figure in summary["figures"]:
            lines.append(f"### {figure['title']}\n\n![{figure['title']}](figures/{figure['png']})\n")
            data = f"[`figures/{figure['csv']}`](figures/{figure['csv']})"
            lines.append(" ".join(figure["findings"]) + f" Data: {data}.\n")
        if summary.get("comparison"):
            comparisons.append(f"- **{notebook}**: " + " ".join(summary["comparison"]))
        sections.append("\n".join(lines))
    alarm = [f"**{len(failed)} notebook(s) FAILED; this report is incomplete:**\n\n"
             + "\n".join(f"- `{notebook}`" + (f": `{line}`" if line else "") for notebook, line in failed.items())
             + "\n"] if failed else []
    head = [
        "# dynbatch report\n", *alarm,
        f"Written by `python -m dynbatch_core report --params {'/'.join(sorted(parameter_sets)) or '?'}` on "
        f"{datetime.date.today().isoformat()} at git commit `{commit}`"
        + (" (`-dirty`: from uncommitted changes on top of that commit)" if commit.endswith("-dirty") else "")
        + f"; {done} of {len(NOTEBOOKS)} notebooks, {total_s / 60:.1f} min of notebook time on {_machine()}. "
        "Each figure's data is the CSV next to it; the executed notebooks are in `notebooks/`. Times are training "
        "seconds (evaluation excluded); where other work shares the CPU they are noisy, and the notebooks say how "
        "noisy where it matters.\n",
        "## Comparison with the class study\n",
        f"In short, {CLASS_STUDY}. What these runs show:\n",
        "\n".join(comparisons) if comparisons else "- (no comparison recorded)",
        "\nScale matters: these are CPU runs on subsets with small ResNets; the `full` parameter set repeats them at "
        "the class study's scale on GPUs.\n"]
    path = out / "REPORT.md"
    text = "\n".join(head + sections)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _parameter_line(repo: Path, notebook: str, executed) -> str:
    """Every parameter as `name=value`: the injected value where papermill injected one, else the default."""
    import ast
    import papermill
    values = {name: info["default"] for name, info in
              papermill.inspect_notebook(str(repo / "notebooks" / f"{notebook}.ipynb")).items()}
    for cell in executed.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                    values[node.targets[0].id] = ast.get_source_segment(cell.source, node.value)
    return ", ".join(f"`{name}={value}`" for name, value in values.items() if name not in ("output_dir", "runs_dir"))


def _machine() -> str:
    import torch
    from .distributed import cpu_cores, visible_gpus
    gpus = visible_gpus()
    device = f"{gpus} GPU(s)" if gpus else "no GPU"
    return f"{cpu_cores()} CPU cores, {device}, Python {platform.python_version()}, torch {torch.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dynbatch_core.report [flags]`: the same as `python -m dynbatch_core report [flags]`."""
    parser = argparse.ArgumentParser(prog="python -m dynbatch_core.report")
    add_report_parser(parser.add_subparsers(dest="command"))
    return main_report(parser.parse_args(["report", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
