"""Figures for the notebooks and the report: functions `DataFrame -> matplotlib Figure`, plus the metrics behind them.

    from dynbatch_core.study import analysis, plots
    epochs = analysis.tag_runs({"static": static.epochs, "loss-plateau": dynamic.epochs})   # adds a 'run' column
    fig = plots.accuracy_vs_time(epochs, title="MNIST, 2 ranks")
    plots.save_figure(fig, "2gpu__accuracy_vs_time", epochs, "outputs/figures")        # PNG + CSV, atomically

Tables are the run folder's tidy tables (records.STEP_COLUMNS, records.EPOCH_COLUMNS) with a `run` column naming
the curve. Every function draws inside one seaborn theme (`_theme`, a context manager: importing this module changes
no global matplotlib state). Times are `wall_s`: cumulative training seconds, evaluation excluded.

The tables the figures draw (per-run efficiency, speed-up, fitted step time, time to reach) come from analysis.py.
"""
from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
from matplotlib import ticker
import pandas as pd
import seaborn as sns
from cycler import cycler

from .analysis import efficiency_table, fitted_step_time_table, run_labels
from ..records import write_atomic

TIME_LABEL = "wall time (s, training only)"
ACCURACY_LABEL = "test accuracy"
LOSS_LABEL = "training loss (epoch mean cross-entropy)"
BATCH_LABEL = "global batch size (samples)"
RANK_BATCH_LABEL = "per-rank batch size (samples)"
STEP_LABEL = "training step"
EFFICIENCY_LABEL = "balance efficiency  Σ compute_i / (n · max compute_i)"
SLOWDOWN_LABEL = "slowdown of the slowest rank k (× slower)"
SPEEDUP_LABEL = "speed-up over the equal split (samples/s ratio)"
FIGURE_DPI = 120


@contextmanager
def _theme():
    """The one theme of every dynbatch figure: seaborn whitegrid, notebook context, colour-blind palette."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook"),
          "axes.prop_cycle": cycler(color=sns.color_palette("colorblind")), "figure.dpi": FIGURE_DPI,
          "savefig.dpi": FIGURE_DPI, "savefig.bbox": "tight", "legend.frameon": True}
    with matplotlib.rc_context(rc):
        yield


def _palette(labels: Sequence[str]) -> dict:
    """One colour per label: the colour-blind palette while it has enough (10), else tab20, so none repeats."""
    return dict(zip(labels, sns.color_palette("colorblind" if len(labels) <= 10 else "tab20", len(labels))))


@contextmanager
def _per_run_figure(table: pd.DataFrame, *, runs: Sequence[str] | None = None, **subplots):
    """The opening of every figure with one curve per run: inside the theme, plt.subplots(**subplots), and for each
    run (default: run_labels(table), in order) its label, its rows of `table` and its colour.

        with _per_run_figure(epochs, figsize=(8, 4.8)) as (fig, ax, curves):
            for run, part, colour in curves:
                ax.plot(part["wall_s"], part["train_loss"], color=colour, label=run)
    """
    runs = run_labels(table) if runs is None else list(runs)
    colours = _palette(runs)
    with _theme():
        fig, axes = plt.subplots(**subplots)
        yield fig, axes, [(run, table[table["run"] == run], colours[run]) for run in runs]


def accuracy_vs_time(epochs: pd.DataFrame, *, title: str = "Test accuracy vs training time",
                     show_batch: bool = False, time_column: str = "wall_s", time_label: str = TIME_LABEL,
                     target: float | None = None) -> plt.Figure:
    """Test accuracy at the end of each epoch against cumulative training seconds, one curve per run.

    show_batch: add a panel with each run's global batch over time (and, for a single run, label each point).
    time_column/time_label: another kind of time (e.g. critical_batch.with_emulated_time's emulated_s).
    target: draw this accuracy as a dashed line (the level a time-to-target was measured against).
    """
    panels = (dict(nrows=2, ncols=1, figsize=(8, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
              if show_batch else dict(figsize=(8, 4.8)))
    with _per_run_figure(epochs, **panels) as (fig, axes, curves):
        ax, ax_batch = axes if show_batch else (axes, None)
        for run, part, colour in curves:
            ax.plot(part[time_column], part["test_acc"], marker="o", color=colour, label=run)
            if show_batch and len(curves) == 1:  # with several runs the labels collide; the panel below shows B
                for x, y, batch in zip(part[time_column], part["test_acc"], part["global_batch"]):
                    ax.annotate(f"B={batch}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center",
                                fontsize="x-small", color=colour,
                                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                      "alpha": 0.8})
            if show_batch:  # the batch holds from the start of its epoch (previous wall_s) to its end
                starts = [0.0] + list(part[time_column])
                ax_batch.step(starts, list(part["global_batch"]) + [part["global_batch"].iloc[-1]],
                              where="post", color=colour, label=run)
        if target is not None:
            ax.axhline(target, color="0.4", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set_ylabel(ACCURACY_LABEL)
        ax.set_title(title)
        ax.legend(title="run", loc="lower right")
        if show_batch:
            ax_batch.set_yscale("log", base=2)
            ax_batch.yaxis.set_major_formatter(ticker.ScalarFormatter())
            ax_batch.set_ylabel(BATCH_LABEL, fontsize="small")
            ax_batch.set_xlabel(time_label)
            _pad_log_axis(ax_batch, epochs["global_batch"])
        else:
            ax.set_xlabel(time_label)
        ax.set_xlim(left=0)
        fig.tight_layout()
    return fig


def _pad_log_axis(ax, values: pd.Series) -> None:
    low, high = float(values.min()), float(values.max())
    ax.set_ylim(low / 1.5, high * 1.5)
    ax.set_yticks(sorted(set(int(v) for v in values)))
    ax.minorticks_off()


def loss_vs_time(epochs: pd.DataFrame, *, title: str = "Training loss vs training time",
                 target_loss: float | None = None) -> plt.Figure:
    """Mean training loss of each epoch (plotted at the epoch's end) against cumulative training seconds.

    target_loss: draw it as a dashed line (the level `time_to_reach` measured against).
    """
    with _per_run_figure(epochs, figsize=(8, 4.8)) as (fig, ax, curves):
        for run, part, colour in curves:
            ax.plot(part["wall_s"], part["train_loss"], marker="o", color=colour, label=run)
        if target_loss is not None:
            ax.axhline(target_loss, color="0.4", linestyle="--", linewidth=1,
                       label=f"target loss {target_loss:.3g}")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(TIME_LABEL)
        ax.set_ylabel(LOSS_LABEL + ", log scale")
        ax.set_xlim(left=0)
        ax.set_title(title)
        ax.legend(title="schedule")
        fig.tight_layout()
    return fig


def rank_batches_over_steps(steps: pd.DataFrame, *, title: str = "Per-rank batch size over training",
                            slowdown: Sequence[float] | None = None) -> plt.Figure:
    """Each rank's batch size at every step, one panel per run (balancer). Rank i is labelled with its k_i from
    `slowdown`, else from the table's slowdown column (k_i over time, e.g. 1→3→1); an `ideal_batch` column is drawn
    dotted."""
    runs = run_labels(steps)
    ranks = sorted(steps["rank"].unique())
    names = {r: f"rank {r}" + (f" (k={_factors(steps, r, slowdown)})" if slowdown is not None or "slowdown" in steps
                               else "") for r in ranks}
    colours = _palette(list(names.values()))
    with _theme():
        fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 1, 4.2), sharey=True, squeeze=False)
        for ax, run in zip(axes[0], runs):
            part = steps[steps["run"] == run]
            for rank in ranks:
                mine = part[part["rank"] == rank]
                ax.plot(mine["step"], mine["rank_batch"], color=colours[names[rank]], label=names[rank],
                        linewidth=1.4, drawstyle="steps-post")
                if "ideal_batch" in mine:
                    ax.plot(mine["step"], mine["ideal_batch"], color=colours[names[rank]], linestyle=":",
                            linewidth=1.2, drawstyle="steps-post")
            ax.set_title(run)
            ax.set_xlabel(STEP_LABEL)
        axes[0][0].set_ylabel(RANK_BATCH_LABEL)
        axes[0][-1].legend(title="rank", loc="best")
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def _factors(steps: pd.DataFrame, rank: int, slowdown: Sequence[float] | None) -> str:
    if slowdown is not None:
        return f"{slowdown[rank]:g}"
    mine = steps[steps["rank"] == rank]
    first_run = run_labels(mine)[0]   # the first run that has this rank (runs of other sizes may share the figure)
    mine = mine[mine["run"] == first_run].sort_values("step")["slowdown"]
    return "→".join(f"{k:g}" for k, _ in itertools.groupby(mine))


def balance_efficiency_over_steps(steps: pd.DataFrame, *, title: str = "Balance efficiency over training",
                                  window: int = 10) -> plt.Figure:
    """Balance efficiency per step (thin) and its centred `window`-step rolling mean (thick), one colour per run.

    Efficiency = Σ_i compute_i / (n · max_i compute_i) (analysis.balance_efficiency): 1 = nobody waited.
    """
    with _per_run_figure(efficiency_table(steps), figsize=(8, 4.8)) as (fig, ax, curves):
        for run, part, colour in curves:
            ax.plot(part["step"], part["efficiency"], color=colour, alpha=0.25, linewidth=0.8)
            smooth = part["efficiency"].rolling(window, min_periods=1, center=True).mean()
            ax.plot(part["step"], smooth, color=colour, linewidth=2, label=run)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(EFFICIENCY_LABEL)
        ax.set_title(title)
        ax.legend(title=f"balancer ({window}-step mean)", loc="lower right")
        fig.tight_layout()
    return fig


def fitted_step_time(steps: pd.DataFrame, *, title: str = "Measured vs fitted compute time per step") -> plt.Figure:
    """Per rank of the model-balancer run(s): measured compute seconds (dots) and the fitted a_i + c_i b_i (line)."""
    table = fitted_step_time_table(steps)
    ranks = sorted(table["rank"].unique()) if not table.empty else []
    colours = _palette([f"rank {r}" for r in ranks])
    with _theme():
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for rank in ranks:
            part = table[table["rank"] == rank]
            colour = colours[f"rank {rank}"]
            ax.scatter(part["step"], part["compute_s"], color=colour, s=10, alpha=0.6, label=f"rank {rank} measured")
            ax.plot(part["step"], part["fitted_s"], color=colour, linewidth=1.8, label=f"rank {rank} fitted a + c·b")
        if table.empty:
            ax.text(0.5, 0.5, "no run with the model balancer", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylim(0, None)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel("compute time per step (s)")
        ax.set_title(title)
        ax.legend(loc="upper right", fontsize="small")
        fig.tight_layout()
    return fig


def speedup_vs_slowdown(table: pd.DataFrame, *, title: str = "Speed-up of balancing vs the slowest rank's slowdown"
                        ) -> plt.Figure:
    """Speed-up over the equal split (from `speedup_table`) against k, with the ceiling mean(speed)/min(speed)."""
    balancers = list(dict.fromkeys(table["balancer"]))
    colours = _palette(balancers)
    with _theme():
        fig, ax = plt.subplots(figsize=(9, 4.8))
        ceiling = table.drop_duplicates("slowest").sort_values("slowest")
        ax.plot(ceiling["slowest"], ceiling["ceiling"], color="0.3", linestyle="--", marker="_", markersize=22,
                markeredgewidth=2, label="ceiling mean(speed)/min(speed)")
        for balancer in balancers:
            part = table[table["balancer"] == balancer].sort_values("slowest")
            ax.plot(part["slowest"], part["speedup"], marker="o", color=colours[balancer], label=balancer)
        slowest = sorted(table["slowest"].unique())
        ax.set_xticks(slowest)
        ax.set_xlim(min(slowest) - 0.5, max(slowest) + 0.5)
        ax.set_xlabel(SLOWDOWN_LABEL)
        ax.set_ylabel(SPEEDUP_LABEL)
        ax.set_ylim(0, max(table["ceiling"].max(), table["speedup"].max()) * 1.15)
        ax.set_title(title)
        ax.legend(title="balancer", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, name: str, data: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `<out_dir>/<name>.png` and the data behind it as `<name>.csv`, each via a temporary name + os.replace."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"png": out_dir / f"{name}.png", "csv": out_dir / f"{name}.csv"}
    write_atomic(paths["png"], lambda tmp: fig.savefig(tmp, format="png", dpi=FIGURE_DPI, bbox_inches="tight"))
    write_atomic(paths["csv"], lambda tmp: data.to_csv(tmp, index=False))
    return paths

