"""The report's two PNGs (throughput, latency), drawn with matplotlib's Agg canvas.

Uses ``matplotlib.figure.Figure`` directly, never pyplot: no display, no global figure
state. Takes a ``reconcile.Report``; computes nothing itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from loadtest.reconcile import KILL_KINDS, FaultResult, Report

# 10 x 4 inches at 100 dpi: 1000 x 400 px, readable inline in a Markdown viewer.
FIGSIZE_IN = (10.0, 4.0)
DPI = 100
# Fault markers: kills in red, everything else (sink/redis faults) in purple.
KILL_COLOR = "tab:red"
OTHER_FAULT_COLOR = "tab:purple"


def _mark_faults(ax: Axes, faults: Sequence[FaultResult]) -> None:
    """A vertical line at each fault's start, a shaded span until its end, its name on top."""
    on_top = blended_transform_factory(ax.transData, ax.transAxes)
    labelled: set[str] = set()

    def once(label: str) -> str | None:
        # One legend entry per kind of mark, not one per fault.
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for fr in faults:
        color = KILL_COLOR if fr.fault.kind in KILL_KINDS else OTHER_FAULT_COLOR
        kind = "kill" if fr.fault.kind in KILL_KINDS else "fault"
        ax.axvline(fr.at_s, color=color, linewidth=1.2, linestyle="--",
                   label=once(f"{kind} start"))  # fmt: skip
        if fr.duration_s is not None and fr.duration_s > 0:
            ax.axvspan(fr.at_s, fr.at_s + fr.duration_s, color=color, alpha=0.12,
                       label=once(f"{kind} active"))  # fmt: skip
        ax.text(fr.at_s, 0.98, f"{fr.fault.name} ", transform=on_top, rotation=90,
                va="top", ha="right", fontsize=8, color=color)  # fmt: skip


def _gapped(values: Sequence[float | None], *, positive: bool = False) -> list[float]:
    """The values with NaN for seconds without one (and, for log axes, for values <= 0), so
    the line breaks there instead of drawing a slope across the gap."""
    nan = math.nan
    return [nan if v is None or (positive and v <= 0) else v for v in values]


def _legend(fig: Figure, ax: Axes) -> None:
    """One legend row under the plot, where it hides no data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4),
                   fontsize=8, frameon=False)  # fmt: skip


def _figure(title: str, ylabel: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("time since run start (s)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _subtitle(report: Report) -> str:
    return f"{report.meta.scenario}"


def plot_throughput(report: Report, path: Path) -> None:
    series = report.series
    fig, ax = _figure(f"Throughput: {_subtitle(report)}", "messages per second")
    seconds = list(range(len(series)))
    ax.plot(seconds, series.accepted, color="tab:blue", linewidth=1.2, label="accepted/s (202)")
    ax.plot(seconds, series.delivered, color="tab:green", linewidth=1.2,
            label="delivered/s (sink)")  # fmt: skip
    failures = [v for v in series.failures_per_s if v is not None]
    if any(v > 0 for v in failures):
        ax.plot(seconds, _gapped(series.failures_per_s), color="tab:orange", linewidth=1.0,
                label="HTTP failures/s (Locust)")  # fmt: skip
    ax.set_xlim(0, max(len(series) - 1, 1))
    ax.set_ylim(bottom=0)
    _mark_faults(ax, report.faults)
    _legend(fig, ax)
    fig.savefig(path)


def plot_latency(report: Report, path: Path) -> None:
    series = report.series
    fig, ax = _figure(f"Latency: {_subtitle(report)}", "latency (ms, log scale)")
    seconds = list(range(len(series)))
    plotted = False
    for values, color, style, label in (
        (series.ingest_p99_ms, "tab:blue", "-", "ingest p99 (Locust, 202 round trip)"),
        (series.ingest_p50_ms, "tab:blue", ":", "ingest p50"),
        (series.e2e_p99_ms, "tab:green", "-", "end-to-end p99 (202 to sink)"),
        (series.e2e_p50_ms, "tab:green", ":", "end-to-end p50"),
    ):
        # Log scale: a delivery seen before its 202 has latency <= 0; it cannot be drawn.
        ys = _gapped(values, positive=True)
        if any(not math.isnan(y) for y in ys):
            ax.plot(seconds, ys, color=color, linestyle=style, linewidth=1.2, label=label)
            plotted = True
    if plotted:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no latency data", transform=ax.transAxes, ha="center", va="center")
    if not series.has_history:
        ax.text(0.01, 0.02, "ingest latency n/a (no Locust history)", transform=ax.transAxes,
                fontsize=8, color="gray")  # fmt: skip
    ax.set_xlim(0, max(len(series) - 1, 1))
    _mark_faults(ax, report.faults)
    _legend(fig, ax)
    fig.savefig(path)


def write_plots(report: Report, run_dir: Path) -> tuple[Path, Path]:
    throughput, latency = run_dir / "throughput.png", run_dir / "latency.png"
    plot_throughput(report, throughput)
    plot_latency(report, latency)
    return throughput, latency
