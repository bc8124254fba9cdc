"""Figures of the cluster notebook (same theme and conventions as plots.py): the simulator against the engine and
against real runs, speed-up over equal against N and against the communication-to-compute ratio, the noise study,
settle steps after a slowdown change, and the planning question.

    fig = cluster_plots.engine_splits(engine.table)        # cluster_validation.engine_validation's table
    fig = cluster_plots.scaling(scaling.table)             # cluster_study.scaling_study's
    fig = cluster_plots.noise(cluster_study.noise_bands(noise.table))

Every function takes its study's table (the CSV saved beside the figure) and returns a Figure.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib import ticker

from .cluster_study import SCENARIO_NAMES
from .plots import RANK_BATCH_LABEL, SPEEDUP_LABEL, STEP_LABEL, _palette, _theme

WORLD_SIZE_LABEL = "ranks N (log scale)"
THROUGHPUT_LABEL = "steady samples/s (second half)"
CEILING_STYLE = dict(color="0.3", linestyle="--", linewidth=1.5)


def _balancers(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["balancer"]))


def _log2_ranks(ax, world_sizes) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(world_sizes)))
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(WORLD_SIZE_LABEL)


def engine_splits(table: pd.DataFrame, *, title: str = "Per-rank batch: engine vs simulator") -> plt.Figure:
    """One panel per (scenario, balancer): each rank's batch over steps as the engine split it (line) and as the
    simulator did (markers); a differing cell is a red cross."""
    scenarios, balancers = list(dict.fromkeys(table["scenario"])), _balancers(table)
    ranks = sorted(table["rank"].unique())
    colours = _palette([f"rank {r}" for r in ranks])
    with _theme():
        fig, axes = plt.subplots(len(scenarios), len(balancers), figsize=(3.6 * len(balancers) + 1,
                                 3.2 * len(scenarios)), sharex=True, squeeze=False)
        for row, scenario in zip(axes, scenarios):
            for ax, balancer in zip(row, balancers):
                part = table[(table["scenario"] == scenario) & (table["balancer"] == balancer)]
                for rank in sorted(part["rank"].unique()):
                    mine = part[part["rank"] == rank].sort_values("step")
                    colour = colours[f"rank {rank}"]
                    ax.plot(mine["step"], mine["engine_batch"], color=colour, linewidth=1.3, drawstyle="steps-post",
                            label=f"rank {rank} (k={mine['slowdown'].iloc[0]:g})")
                    ax.plot(mine["step"], mine["simulated_batch"], linestyle="none", marker="o", markersize=3.5,
                            markerfacecolor="none", color=colour)
                wrong = part[part["differs"]]
                ax.plot(wrong["step"], wrong["simulated_batch"], linestyle="none", marker="x", color="red",
                        markersize=7)
                ax.set_title(f"{scenario} {balancer}: {int(part['differs'].sum())} of {len(part)} differ",
                             fontsize="small")
                ax.legend(fontsize="x-small", loc="best")
            row[0].set_ylabel(RANK_BATCH_LABEL)
        for ax in axes[-1]:
            ax.set_xlabel(STEP_LABEL)
        fig.suptitle(title + "  (line: engine, circles: simulator)")
        fig.tight_layout()
    return fig


def real_validation(table: pd.DataFrame, *, title: str = "Simulated vs real runs") -> plt.Figure:
    """One row per calibration (real_validations' calibrate_on): per balancer, the real repeats as points (the
    calibration repeat hollow) and the simulated seeds as a band (their range) with their median; steady
    throughput and settle steps side by side."""
    balancers = _balancers(table)
    calibrations = list(dict.fromkeys(table["calibrate_on"]))
    panels = (("throughput", THROUGHPUT_LABEL), ("settle_steps", "settle steps (to the equal-time split)"))
    with _theme():
        fig, axes = plt.subplots(len(calibrations), 2, figsize=(11, 3.4 * len(calibrations) + 0.8), squeeze=False)
        for row, calibrate_on in zip(axes, calibrations):
            part = table[table["calibrate_on"] == calibrate_on]
            for ax, (column, label) in zip(row, panels):
                _real_vs_simulated(ax, part, balancers, column)
                ax.set_ylabel(label)
                ax.set_title(f"calibrated on {calibrate_on} repeat 0", fontsize="small")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize="small", frameon=False)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _real_vs_simulated(ax, table: pd.DataFrame, balancers, column: str) -> None:
    for x, balancer in enumerate(balancers):
        real = table[(table["balancer"] == balancer) & (table["source"] == "real")]
        simulated = table[(table["balancer"] == balancer) & (table["source"] == "simulated")][column].dropna()
        if not simulated.empty:
            ax.fill_between([x + 0.05, x + 0.35], simulated.min(), simulated.max(), color="C0", alpha=0.3,
                            label="simulated (range over seeds)" if x == 0 else None)
            ax.plot([x + 0.05, x + 0.35], [simulated.median()] * 2, color="C0", linewidth=2.5,
                    label="simulated median" if x == 0 else None)
        for calibrated, marker in ((False, "o"), (True, "D")):
            points = real[real["calibration"] == calibrated].sort_values("index")
            offsets = x - 0.3 + 0.05 * points["index"].to_numpy()   # repeats side by side: equal values stay visible
            ax.scatter(offsets, points[column], color="C1", marker=marker, s=36,
                       facecolors="none" if calibrated else "C1", zorder=3,
                       label=("real repeat (calibrated on)" if calibrated else "real repeats") if x == 0 else None)
        never = int(table[table["balancer"] == balancer][column].isna().sum())
        if never:
            ax.annotate(f"{never} never settled", (x, 0), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize="x-small", xycoords=("data", "axes fraction"))
    ax.set_xticks(range(len(balancers)), balancers)
    ax.set_xlim(-0.6, len(balancers) - 0.4)
    if column == "settle_steps":
        ax.set_ylim(0, None)   # throughput keeps its own limits: the repeats differ by a few percent


def scaling(table: pd.DataFrame, *, title: str = "Speed-up over the equal split vs N") -> plt.Figure:
    """Per scenario (columns): speed-up over equal against N with the ceiling (top), and speed-up / ceiling
    (bottom), one line per balancer."""
    scenarios = list(dict.fromkeys(table["scenario"]))
    balancers = [b for b in _balancers(table) if b != "equal"]
    colours = _palette(balancers)
    with _theme():
        fig, axes = plt.subplots(2, len(scenarios), figsize=(4.6 * len(scenarios) + 1, 7.6), squeeze=False,
                                 sharex=True)
        for column, name in enumerate(scenarios):
            part = table[table["scenario"] == name]
            top, bottom = axes[0][column], axes[1][column]
            ceiling = part.drop_duplicates("world_size").sort_values("world_size")
            top.plot(ceiling["world_size"], ceiling["ceiling"], **CEILING_STYLE, label="ceiling")
            for balancer in balancers:
                mine = part[part["balancer"] == balancer].sort_values("world_size")
                top.plot(mine["world_size"], mine["speedup"], marker="o", color=colours[balancer], label=balancer)
                bottom.plot(mine["world_size"], mine["fraction"], marker="o", color=colours[balancer],
                            label=balancer)
            top.set_title(SCENARIO_NAMES[name].format(k=3) if name in SCENARIO_NAMES else name)
            top.set_ylim(0.9, part[["ceiling", "speedup"]].max().max() * 1.1)
            bottom.set_ylim(min(0.5, part["fraction"].min() - 0.05), 1.02)
            _log2_ranks(bottom, part["world_size"])
        axes[0][0].set_ylabel("speed-up over equal")
        axes[1][0].set_ylabel("share of the ceiling")
        axes[0][-1].legend(title="balancer", fontsize="small", loc="lower right")
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def _lines_over_a_bound(ax, table: pd.DataFrame, x: str, y: str, *, bound: tuple[str, str], balancers,
                        colours) -> None:
    """The bound's column (the same for every balancer) dashed, then one line of `y` against `x` per balancer."""
    column, label = bound
    shared = table.drop_duplicates(x).sort_values(x)
    ax.plot(shared[x], shared[column], **CEILING_STYLE, label=label)
    for balancer in balancers:
        part = table[table["balancer"] == balancer].sort_values(x)
        ax.plot(part[x], part[y], marker="o", color=colours[balancer], label=balancer)


def communication(table: pd.DataFrame, *, title: str = "Speed-up vs the reduction's share of the step"
                  ) -> plt.Figure:
    """Speed-up over equal against exposed reduction / the equal split's step compute, with the ceiling."""
    balancers = [b for b in _balancers(table) if b != "equal"]
    colours = _palette(balancers)
    with _theme():
        fig, ax = plt.subplots(figsize=(8, 4.8))
        _lines_over_a_bound(ax, table, "ratio", "speedup", bound=("ceiling", "ceiling (equal + R) / (ideal + R)"),
                            balancers=balancers, colours=colours)
        ax.axhline(1.0, color="0.6", linewidth=1)
        ax.set_xlabel("exposed reduction R / the equal split's step compute")
        ax.set_ylabel(SPEEDUP_LABEL)
        ax.set_ylim(0.9, None)
        ax.set_title(title)
        ax.legend(title="balancer", fontsize="small")
        fig.tight_layout()
    return fig


def noise(bands: pd.DataFrame, *, title: str = "Speed-up over equal under noise") -> plt.Figure:
    """Rows: N; columns: without / with spikes. Per balancer: the seeds' median speed-up over equal against the
    noise's CV, with the band cluster_study.noise_bands gives (10th-90th percentile)."""
    sizes = sorted(bands["world_size"].unique())
    spikes = sorted(bands["spike_prob"].unique())
    balancers = [b for b in _balancers(bands) if b != "equal"]
    colours = _palette(balancers)
    with _theme():
        fig, axes = plt.subplots(len(sizes), len(spikes), figsize=(5.2 * len(spikes) + 1, 3.8 * len(sizes)),
                                 squeeze=False, sharex=True, sharey=True)
        for row, n in zip(axes, sizes):
            for ax, spike_prob in zip(row, spikes):
                part = bands[(bands["world_size"] == n) & (bands["spike_prob"] == spike_prob)]
                for balancer in balancers:
                    mine = part[part["balancer"] == balancer].sort_values("cv")
                    x = 100 * mine["cv"]
                    ax.plot(x, mine["median"], marker="o", color=colours[balancer], label=balancer)
                    ax.fill_between(x, mine["low"], mine["high"], color=colours[balancer], alpha=0.2)
                seeds = int(part["seeds"].max()) if not part.empty else 0
                spikes_text = f"spikes {100 * spike_prob:g} % of steps" if spike_prob else "no spikes"
                ax.set_title(f"N = {n}, {spikes_text}, {seeds} seeds", fontsize="small")
            row[0].set_ylabel("speed-up over equal")
        for ax in axes[-1]:
            ax.set_xlabel("noise CV (%)")
        axes[0][-1].legend(title="balancer (median, 10-90 %)", fontsize="small", loc="lower left")
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def settle(table: pd.DataFrame, *, title: str = "Steps to settle after half the ranks slow down") -> plt.Figure:
    """Settle steps against N per balancer; a run that never settled is a cross at the top, labelled."""
    balancers = _balancers(table)
    colours = _palette(balancers)
    top = float(table["steps_after"].max())
    with _theme():
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for balancer in balancers:
            part = table[table["balancer"] == balancer].sort_values("world_size")
            settled = part.dropna(subset=["settle_steps"])
            ax.plot(settled["world_size"], settled["settle_steps"], marker="o", color=colours[balancer],
                    label=balancer)
            never = part[part["settle_steps"].isna()]
            ax.plot(never["world_size"], [top] * len(never), linestyle="none", marker="x", markersize=9,
                    color=colours[balancer], label=f"{balancer}: never settled" if len(never) else None)
        ax.axhline(top, color="0.6", linewidth=1, linestyle=":")
        ax.text(0.01, top, " the run's end", transform=ax.get_yaxis_transform(), va="bottom", fontsize="x-small")
        _log2_ranks(ax, table["world_size"])
        ax.set_ylim(0, top * 1.12)
        ax.set_ylabel("steps from the change to settled")
        ax.set_title(title)
        ax.legend(title="balancer", fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        fig.tight_layout()
    return fig


def planning(table: pd.DataFrame, *, title: str = "Time per epoch with older cards added") -> plt.Figure:
    """Seconds per epoch against the number of older cards added, per balancer, with the equal-time split's
    noiseless time (dashed) and the fastest run without them (dotted)."""
    balancers = _balancers(table)
    colours = _palette(balancers)
    old, new = table["old_card"].iloc[0], table["new_card"].iloc[0]
    with _theme():
        fig, ax = plt.subplots(figsize=(8, 4.8))
        _lines_over_a_bound(ax, table, "added", "epoch_s", bound=("ideal_epoch_s", "equal-time split (noiseless)"),
                            balancers=balancers, colours=colours)
        without = table.loc[table["added"] == table["added"].min(), "epoch_s"].min()
        ax.axhline(without, color="0.5", linestyle=":", label="without them (fastest)")
        ax.set_xticks(sorted(table["added"].unique()))
        ax.set_xlabel(f"{old} cards added to {int(table['new_count'].iloc[0])} × {new}")
        ax.set_ylabel("seconds per epoch (last epoch)")
        ax.set_ylim(0, table["epoch_s"].max() * 1.1 if math.isfinite(table["epoch_s"].max()) else None)
        ax.set_title(title)
        ax.legend(title="balancer", fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        fig.tight_layout()
    return fig
