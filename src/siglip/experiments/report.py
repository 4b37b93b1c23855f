"""A study's report: Markdown tables beside the paper's figures, matplotlib PNG plots, and per-seed JSON.

A study's run builds a `Report` (plain data) and `write_report` turns it into DIR/report.md, DIR/*.png and
DIR/results.json. Nothing here knows about models or losses, so the writer is tested on made-up numbers. Plots go
through matplotlib's object API with the Agg canvas: no pyplot, no global figure state, no display needed. Every
plot of a metric draws its chance level, and every table of one prints it.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

MACHINE = "2-core CPU, no GPU"
"""The machine every full-mode figure in docs/experiments.md was measured on; reports name the one they ran on."""


@dataclass
class Table:
    """One Markdown table: a header row and rows of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    """A line under the table: what a cell means (e.g. "mean ± standard deviation over 4 seeds")."""


@dataclass
class Series:
    """One line of a plot: x and y values, and an optional band of +- spread around y."""

    label: str
    x: list[float]
    y: list[float]
    spread: list[float] | None = None


@dataclass
class Plot:
    """One PNG: several series on shared axes, with the chance level drawn as a dashed line."""

    filename: str
    """File name inside the report directory, ending in .png."""
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    chance: float | None = None
    """The y of a model that learned nothing (None only where no such level exists); drawn dashed, labelled."""
    chance_label: str = "chance"
    logx: bool = False
    logy: bool = False
    bars: bool = False
    """One bar per series (its first y, its spread as an error bar) instead of lines."""
    xticklabels: list[str] | None = None
    """Names for the x positions 0, 1, ... where x is categorical (a corruption, say) rather than a quantity."""


@dataclass
class Report:
    """What a study found, ready to be written."""

    study: str
    title: str
    claim: str
    """The paper's claim, in our words, with its section."""
    verdicts: list[str]
    """One line per tested claim: the verdict first."""
    scope: str
    """What this scale can and cannot test."""
    setup: list[str]
    paper: list[tuple[str, Table | None, Plot | None]] = field(default_factory=list)
    """The paper's figures: (where they come from, its numbers, its curve)."""
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    """Per-seed data written to results.json (the arms, every trial's metrics, the comparisons)."""
    smoke: bool = False
    seconds: float = 0.0
    """Wall-clock time of the whole study."""
    cpu_seconds: float = math.nan
    """CPU time (user and system) of the study's processes: what two idle cores would need about half of."""
    load: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    """One-minute load average: at the start, the mean over the trials' ends, at the end."""


def write_report(report: Report, directory: str | Path) -> Path:
    """Write report.md, results.json and every plot's PNG into `directory` (created if missing); returns report.md."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for plot in report.plots + [plot for _, _, plot in report.paper if plot is not None]:
        draw_plot(plot, out / plot.filename)
    (out / "results.json").write_text(results_text(report.results), encoding="utf-8")
    path = out / "report.md"
    path.write_text(render_markdown(report), encoding="utf-8")
    return path


def results_text(results: dict) -> str:
    """JSON of the per-seed results: keys indented, each trial on a line of its own (diffs stay readable)."""
    head = json.dumps({key: value for key, value in results.items() if key != "trials"}, indent=1)
    if "trials" not in results:
        return head + "\n"
    body = ",\n".join("  " + json.dumps(trial) for trial in results["trials"])
    opening = head[:-2] + ",\n" if head != "{}" else "{\n"         # head ends in "\n}"
    return opening + ' "trials": [\n' + body + "\n ]\n}\n"


def render_markdown(report: Report) -> str:
    """The report as Markdown: claim, verdicts, the paper's figures, scope, setup, our tables and plots."""
    lines = [f"# {report.title}", ""]
    if report.smoke:
        lines += ["> **Smoke run.** A few steps on tiny data, to check the code path end to end. The numbers below "
                  "are not findings; run without `--smoke` for those.", ""]
    lines += ["## The paper's claim", "", report.claim, "", "## Verdicts", ""]
    lines += [f"- {line}" for line in report.verdicts] + [""]
    lines += ["## What this scale tests", "", report.scope, ""]
    if report.paper:
        lines += ["## The paper's figures", ""]
        for source, table, plot in report.paper:
            lines += [source, ""]
            if table is not None:
                lines += [markdown_table(table.columns, table.rows), ""] + ([table.note, ""] if table.note else [])
            if plot is not None:
                lines += [f"![{plot.title}]({plot.filename})", ""]
    lines += ["## Setup", ""] + [f"- {line}" for line in report.setup]
    start, mean, end = report.load
    lines += [f"- Machine: {machine_description()}; study wall time {report.seconds:.0f} s, CPU time "
              f"{report.cpu_seconds:.0f} s; one-minute load average {start:.1f} at the start, {mean:.1f} on average "
              f"at the trials' ends, {end:.1f} at the end (other jobs shared the machine).",
              "- Per-seed results: [results.json](results.json).", ""]
    lines += ["## Results", ""]
    for table in report.tables:
        lines += [f"### {table.title}", "", markdown_table(table.columns, table.rows), ""]
        lines += [table.note, ""] if table.note else []
    lines += [f"![{plot.title}]({plot.filename})\n" for plot in report.plots]
    return "\n".join(lines)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; every row must have one cell per column."""
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"table row {row!r} has {len(row)} cells, expected {len(columns)} (columns {columns})")
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def draw_plot(plot: Plot, path: Path) -> None:
    """Render one plot to a PNG at `path`."""
    plot_figure(plot).savefig(path)


def plot_figure(plot: Plot):
    """The matplotlib Figure of a plot, chance as a dashed grey horizontal line labelled `chance_label`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if plot.bars:
        _draw_bars(axes, plot.series)
    for series in [] if plot.bars else plot.series:
        (line,) = axes.plot(series.x, series.y, label=series.label, marker="o" if len(series.x) <= 12 else None)
        if series.spread is not None:
            low = [y - s for y, s in zip(series.y, series.spread, strict=True)]
            high = [y + s for y, s in zip(series.y, series.spread, strict=True)]
            axes.fill_between(series.x, low, high, alpha=0.2, color=line.get_color())
    if plot.chance is not None:
        axes.axhline(plot.chance, color="grey", linestyle="--", linewidth=1.2, label=plot.chance_label)
    if plot.logx:
        axes.set_xscale("log", base=2)
    if plot.xticklabels is not None:
        axes.set_xticks(range(len(plot.xticklabels)), plot.xticklabels)
    if plot.logy:
        axes.set_yscale("log")
    axes.set_title(plot.title, fontsize="medium")
    axes.set_xlabel(plot.xlabel)
    axes.set_ylabel(plot.ylabel)
    axes.grid(alpha=0.3)
    if plot.series or plot.chance is not None:
        axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _draw_bars(axes, series_list: list[Series]) -> None:
    positions = list(range(len(series_list)))
    heights = [series.y[0] for series in series_list]
    errors = [series.spread[0] if series.spread else 0.0 for series in series_list]
    axes.bar(positions, heights, yerr=errors, capsize=4, color=[f"C{i % 10}" for i in positions])
    axes.set_xticks(positions, [series.label for series in series_list], rotation=25, ha="right", fontsize="small")


def machine_description() -> str:
    """The machine this process runs on, in the words docs use (cores, accelerator)."""
    import torch

    cores = os.cpu_count() or 0
    accelerator = "GPU" if torch.cuda.is_available() else "no GPU"
    return f"{cores}-core CPU ({platform.machine()}), {accelerator}, torch {torch.__version__}"
