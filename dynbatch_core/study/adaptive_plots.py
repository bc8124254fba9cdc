"""Figures of the adaptive-batch notebook (same theme and conventions as plots.py): the race to the target in
emulated time, the noise scale over training, the global batch a run chose over time, and the measured critical
batch against the noise scale.

    fig = adaptive_plots.accuracy_race(epochs, race, target=0.9)       # epochs: adaptive_findings.emulated_epochs
    fig = adaptive_plots.noise_scale_over_training(epochs)             # epochs: tagged runs with noise_scale
    fig = adaptive_plots.batch_over_time(adaptive_findings.batch_timeline(runs), time_column="emulated_s")
    fig = adaptive_plots.critical_batch(sweep, fit, noise_scale=120.0)  # sweep: critical_batch.static_sweep
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import ticker

from .analysis import run_labels
from .critical_batch import CriticalBatchFit
from .plots import BATCH_LABEL, _per_run_figure, _theme, accuracy_vs_time

NOISE_LABEL = "noise scale B_simple = tr(Σ) / |G|²  (samples)"
SAMPLES_LABEL = "training samples seen"


def _log2_axis(axis) -> None:
    axis.set_major_formatter(ticker.ScalarFormatter())
    axis.set_minor_formatter(ticker.NullFormatter())


def accuracy_race(epochs: pd.DataFrame, race: pd.DataFrame, *, time_column: str = "emulated_s",
                  time_label: str = "emulated GPU-like time (s)", target: float | None = None,
                  title: str = "Test accuracy vs emulated time") -> plt.Figure:
    """plots.accuracy_vs_time on `time_column`, its time axis cut at 3x the median time to the target over the
    runs of `race` (adaptive_findings.race_table), so that runs far slower than the rest do not squeeze them."""
    fig = accuracy_vs_time(epochs, title=title, time_column=time_column, time_label=time_label, target=target)
    times = race[time_column]
    fig.axes[0].set_xlim(0, 3 * times.median() if times.notna().any() else None)
    return fig


def noise_scale_over_training(epochs: pd.DataFrame, *, title: str = "Gradient noise scale over training"
                              ) -> plt.Figure:
    """Each run's epoch noise scale (epochs.csv noise_scale) against the samples it had seen by the epoch's end."""
    runs = [run for run in run_labels(epochs) if epochs.loc[epochs["run"] == run, "noise_scale"].notna().any()]
    with _per_run_figure(epochs, runs=runs, figsize=(8, 4.4)) as (fig, ax, curves):
        for run, part, colour in curves:
            ax.plot(part["samples"].cumsum(), part["noise_scale"], marker="o", color=colour, label=run)
        ax.set_yscale("log", base=2)
        _log2_axis(ax.yaxis)
        ax.set_xlabel(SAMPLES_LABEL)
        ax.set_ylabel(NOISE_LABEL, fontsize="small")
        ax.set_title(title)
        ax.legend(title="run", loc="best", fontsize="small")
        fig.tight_layout()
    return fig


def batch_over_time(timeline: pd.DataFrame, *, time_column: str = "emulated_s", time_label: str = "time (s)",
                    title: str = "Global batch over training") -> plt.Figure:
    """Each run's global batch at every step against time: `timeline` is adaptive_findings.batch_timeline's table
    (critical_batch.emulated_timeline per run, with a run column)."""
    with _per_run_figure(timeline, figsize=(8, 4.0)) as (fig, ax, curves):
        for run, part, colour in curves:
            ax.step(part[time_column], part["global_batch"], where="pre", color=colour, label=run)
        ax.set_yscale("log", base=2)
        ax.set_yticks(sorted(set(int(b) for b in timeline["global_batch"])))
        _log2_axis(ax.yaxis)
        ax.set_xlabel(time_label)
        ax.set_ylabel(BATCH_LABEL, fontsize="small")
        ax.set_xlim(left=0)
        ax.set_title(title)
        ax.legend(title="run", loc="best", fontsize="small")
        fig.tight_layout()
    return fig


def critical_batch(sweep: pd.DataFrame, fit: CriticalBatchFit, *, noise_scale: float,
                   title: str = "Steps vs samples to the target: measured critical batch vs noise scale"
                   ) -> plt.Figure:
    """McCandlish's trade-off plane: each static batch's (samples, steps) to the target, the fitted curve
    (S/S_min - 1)(E/E_min - 1) = 1, and two batch sizes as rays E = B S: the critical batch the fit measured
    (B_crit = E_min/S_min) and the noise scale B_simple the estimator measured."""
    reached = sweep[np.isfinite(sweep["samples"])]
    with _theme():
        fig, ax = plt.subplots(figsize=(7.5, 5.2))
        if reached.empty:
            ax.text(0.5, 0.5, "no static batch reached the target", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title, fontsize="medium")
            return fig
        steps = reached["samples"] / reached["batch"]
        ax.scatter(reached["samples"], steps, color="black", zorder=3, label="static batches (measured)")
        for batch, x, y in zip(reached["batch"], reached["samples"], steps):
            ax.annotate(f"B={int(batch)}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize="x-small")
        low, high = float(reached["batch"].min()) / 2, float(reached["batch"].max()) * 2
        batches = np.geomspace(low, high, 200)
        if math.isfinite(fit.critical_batch):
            curve = fit.steps_at(batches)
            ax.plot(batches * curve, curve, color="tab:blue",
                    label=f"fit S = S_min (1 + B_crit/B): S_min={fit.min_steps:.0f}, E_min={fit.min_samples:.0f}")
        span = np.array([float(steps.min()) / 1.5, float(steps.max()) * 1.5])
        for batch, colour, name in ((fit.critical_batch, "tab:blue", "B_crit (from the sweep)"),
                                    (noise_scale, "tab:orange", "B_simple (estimated)")):
            if math.isfinite(batch) and batch > 0:
                ax.plot(batch * span, span, linestyle="--", color=colour, label=f"{name} = {batch:.0f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("samples to the target  E")
        ax.set_ylabel("steps to the target  S")
        ax.set_title(title, fontsize="medium")
        ax.legend(loc="best", fontsize="x-small")
        fig.tight_layout()
    return fig
