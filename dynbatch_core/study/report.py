"""The report: run every notebook with papermill, keep each figure (PNG + CSV), and write outputs/REPORT.md.

    python -m dynbatch_core report                    # the `report` parameter set (CPU, ~45 min on 2 cores)
    python -m dynbatch_core report --params defaults  # the notebooks' own small defaults (a minute or two each)
    python -m dynbatch_core report --notebooks 4gpu   # re-run one notebook; REPORT.md still covers all of them
    python -m dynbatch_core report --no-execute       # only rewrite REPORT.md from what outputs/ holds

Parameter sets are YAML files next to the notebooks (notebooks/params/<set>/<notebook>.yaml, papermill's `-f`);
`output_dir` is injected so that figures land in <out>/figures, while a notebook run by hand or by nbval keeps its
default scratch folder (runs/notebook-figures). Executed notebooks go to <out>/notebooks. What the notebooks
call is in notebook.py (folders, configs, summary JSON) and findings.py (sentences from numbers).
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

from .findings import CLASS_STUDY
from ..records import write_atomic
from .notebook import find_repo_root
from ..records import git_commit

NOTEBOOKS = ("1gpu_mnist", "1gpu_cifar10", "2gpu", "4gpu", "heterogeneous", "adaptive", "cluster")
PARAMETER_SETS = ("report", "full", "defaults")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


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


def strip_widgets(notebook):
    """The notebook without its runs' progress widgets (outputs and stored widget state): live progress in
    JupyterLab, nothing in an executed report notebook, where no widget can render."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [output for output in cell.outputs if WIDGET_VIEW not in output.get("data", {})]
    notebook.metadata.pop("widgets", None)
    return notebook


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
    executed = strip_widgets(nbformat.read(str(target), as_version=4))
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
    report_path = write_report(repo, out, failed, parameter_set=args.params)
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


def write_report(repo: Path, out: Path, failed: dict[str, str] | Sequence[str] = (), *,
                 parameter_set: str | None = None) -> Path:
    """<out>/REPORT.md from <out>/figures/*__summary.json and the executed notebooks' metadata. `failed`: the
    notebooks that failed, with their error lines (a dict) or without (a list); each is named, with its error, at
    the top of the report, where no reader can miss it. parameter_set: the set this command ran (named even when
    no notebook of it succeeded)."""
    failed = dict(failed) if isinstance(failed, dict) else {notebook: "" for notebook in failed}
    sections = [_notebook_section(repo, out, notebook, failed) for notebook in NOTEBOOKS]
    ran = [section for section in sections if section.ran]
    parameter_sets = ({parameter_set} - {None}) | {section.parameter_set for section in ran}
    head = _report_head(failed, parameter_sets, ran=len(ran), minutes=sum(s.seconds for s in ran) / 60,
                        comparisons=[section.comparison for section in ran if section.comparison])
    path = out / "REPORT.md"
    text = "\n".join(head + [section.text for section in sections])
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return path


@dataclasses.dataclass(frozen=True)
class _Section:
    """One notebook's part of REPORT.md."""
    text: str
    ran: bool = False                 # its summary and executed copy are there, and it did not fail
    seconds: float = 0.0              # the executed notebook's time
    parameter_set: str | None = None  # the set it ran with
    comparison: str | None = None     # its line under "Comparison with the class study"


def _notebook_section(repo: Path, out: Path, notebook: str, failed: Mapping[str, str]) -> _Section:
    """The notebook's section: each figure with its findings and data, from its summary JSON; or one line saying it
    failed (with its error) or was not run."""
    summary_path = out / "figures" / f"{notebook}__summary.json"
    executed_path = out / "notebooks" / f"{notebook}.ipynb"
    if notebook in failed or not summary_path.exists() or not executed_path.exists():
        state = "failed" if notebook in failed else "not run"
        reason = f": `{failed[notebook]}`" if failed.get(notebook) else ""
        return _Section(f"## {notebook}\n\n*{state}*{reason} — see `{executed_path.relative_to(out)}`.\n")
    import nbformat   # here, like the module's other notebook tooling: the CLI imports this module for every command
    summary = json.loads(summary_path.read_text())
    executed = nbformat.read(str(executed_path), as_version=4)
    meta = executed.metadata.get("dynbatch", {})
    parameter_set = meta.get("parameter_set", "?")
    source = ("the notebook's defaults" if parameter_set == "defaults" else
              f"`notebooks/params/{parameter_set}/{notebook}.yaml`")
    lines = [f"## {notebook}\n",
             f"Executed copy [`notebooks/{notebook}.ipynb`](notebooks/{notebook}.ipynb) of the repository's "
             f"`notebooks/{notebook}.ipynb` ({meta.get('seconds', float('nan')) / 60:.1f} min), parameters "
             f"from {source}, git commit `{summary.get('git_commit')}`.\n",
             f"Parameters: {_parameter_line(repo, notebook, executed)}.\n"]
    if summary.get("headline"):   # a notebook's answers in a few sentences, before its figures (cluster's)
        lines.append("**In short:** " + " ".join(summary["headline"]) + "\n")
    for figure in summary["figures"]:
        lines.append(f"### {figure['title']}\n\n![{figure['title']}](figures/{figure['png']})\n")
        data = f"[`figures/{figure['csv']}`](figures/{figure['csv']})"
        lines.append(" ".join(figure["findings"]) + f" Data: {data}.\n")
    comparison = f"- **{notebook}**: " + " ".join(summary["comparison"]) if summary.get("comparison") else None
    return _Section("\n".join(lines), ran=True, seconds=meta.get("seconds", 0.0), parameter_set=parameter_set,
                    comparison=comparison)


def _report_head(failed: Mapping[str, str], parameter_sets: set[str], *, ran: int, minutes: float,
                 comparisons: Sequence[str]) -> list[str]:
    """The top of REPORT.md: the failed notebooks first, then how it was written, then the comparison with the
    class study."""
    commit = git_commit() or "unknown"
    alarm = [f"**{len(failed)} notebook(s) FAILED; this report is incomplete:**\n\n"
             + "\n".join(f"- `{notebook}`" + (f": `{line}`" if line else "") for notebook, line in failed.items())
             + "\n"] if failed else []
    return [
        "# dynbatch report\n", *alarm,
        f"Written by `python -m dynbatch_core report --params {'/'.join(sorted(parameter_sets)) or '?'}` on "
        f"{datetime.date.today().isoformat()} at git commit `{commit}`"
        + (" (`-dirty`: from uncommitted changes on top of that commit)" if commit.endswith("-dirty") else "")
        + f"; {ran} of {len(NOTEBOOKS)} notebooks, {minutes:.1f} min of notebook time on {_machine()}. "
        "Each figure's data is the CSV next to it; the executed notebooks are in `notebooks/`. Times are training "
        "seconds (evaluation excluded); where other work shares the CPU they are noisy, and the notebooks say how "
        "noisy where it matters.\n",
        "## Comparison with the class study\n",
        f"In short, {CLASS_STUDY}. What these runs show:\n",
        "\n".join(comparisons) if comparisons else "- (no comparison recorded)",
        "\nThese runs are at the class study's scale (the `full` parameter set: full datasets, ResNet-18, GPUs).\n"
        if parameter_sets == {"full"} else
        "\nScale matters: these are CPU runs on subsets with small ResNets; the `full` parameter set repeats them at "
        "the class study's scale on GPUs.\n"]


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
    from ..engine.distributed import cpu_cores, visible_gpus
    gpus = visible_gpus()
    device = f"{gpus} GPU(s)" if gpus else "no GPU"
    return f"{cpu_cores()} CPU cores, {device}, Python {platform.python_version()}, torch {torch.__version__}"
