"""A study's report: Markdown tables beside the paper's claim, and matplotlib PNG plots.

A study builds a `Report` (plain data) and `write_report` turns it into DIR/report.md and DIR/*.png. Nothing here
knows about models or losses, so the writer can be tested on made-up numbers. Plots go through matplotlib's
object API with the Agg canvas: no pyplot, no global figure state, no display needed.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

MACHINE = "2-core CPU, no GPU"
"""The machine every full-mode figure in docs/experiments.md was measured on; reports name the one they ran on."""


@dataclass
class Table:
    """One Markdown table: a header row and rows of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    """A line under the table: what a cell means (e.g. "mean ± standard deviation over 3 seeds")."""


@dataclass
class Series:
    """One line of a plot: x and y values, and an optional band of +- spread around y."""

    label: str
    x: list[float]
    y: list[float]
    spread: list[float] | None = None


@dataclass
class Plot:
    """One PNG: several series on shared axes."""

    filename: str
    """File name inside the report directory, ending in .png."""
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    logx: bool = False
    logy: bool = False
    bars: bool = False
    """Draw one bar per series (its first y, with its spread as an error bar) instead of lines."""


@dataclass
class Report:
    """What a study found, ready to be written."""

    study: str
    """The study's command name, e.g. "batch-size"."""
    title: str
    claim: str
    """The paper's claim, in our words, with the section or figure it comes from."""
    verdict: str
    """What we measured, set beside the claim: agrees, disagrees, or does not reproduce at this scale, and why."""
    setup: list[str]
    """Lines describing the run: data, model, steps, seeds, the command that reproduces it."""
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    smoke: bool = False
    seconds: float = 0.0
    """Wall-clock time of the whole study."""


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN entries (diverged runs) propagate."""
    if not values:
        return math.nan, math.nan
    tensor = torch.tensor(values, dtype=torch.float64)
    spread = float(tensor.std()) if len(values) > 1 else 0.0
    return float(tensor.mean()), spread


def format_mean(values: list[float], *, percent: bool = False, digits: int = 1) -> str:
    """'mean ± sd' over seeds (just the value for one seed); percent multiplies by 100."""
    mean, spread = mean_and_spread(values)
    factor = 100.0 if percent else 1.0
    if math.isnan(mean):
        return "diverged"
    if len(values) == 1:
        return f"{mean * factor:.{digits}f}"
    return f"{mean * factor:.{digits}f} ± {spread * factor:.{digits}f}"


def write_report(report: Report, directory: str | Path) -> Path:
    """Write report.md and every plot's PNG into `directory` (created if missing); returns the report's path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for plot in report.plots:
        draw_plot(plot, out / plot.filename)
    path = out / "report.md"
    path.write_text(render_markdown(report), encoding="utf-8")
    return path


def render_markdown(report: Report) -> str:
    """The report as Markdown: claim, verdict, setup, tables, then the plots as images."""
    lines = [f"# {report.title}", ""]
    if report.smoke:
        lines += [
            "> **Smoke run.** A few steps on tiny data, to check the code path end to end. "
            "The numbers below are not findings; run without `--smoke` for those.",
            "",
        ]
    lines += ["## The paper's claim", "", report.claim, "", "## What we measured", "", report.verdict, ""]
    lines += ["## Setup", ""]
    lines += [f"- {line}" for line in report.setup]
    lines += [
        f"- Machine: {machine_description()}; study wall time {report.seconds:.0f} s.",
        "",
    ]
    for table in report.tables:
        lines += [f"### {table.title}", "", markdown_table(table.columns, table.rows), ""]
        if table.note:
            lines += [table.note, ""]
    for plot in report.plots:
        lines += [f"![{plot.title}]({plot.filename})", ""]
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
    if plot.logx:
        axes.set_xscale("log", base=2)
    if plot.logy:
        axes.set_yscale("log")
    axes.set_title(plot.title)
    axes.set_xlabel(plot.xlabel)
    axes.set_ylabel(plot.ylabel)
    axes.grid(alpha=0.3)
    if plot.series and not plot.bars:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)


def _draw_bars(axes, series_list: list[Series]) -> None:
    positions = list(range(len(series_list)))
    heights = [series.y[0] for series in series_list]
    errors = [series.spread[0] if series.spread else 0.0 for series in series_list]
    axes.bar(positions, heights, yerr=errors, capsize=4, color=[f"C{i}" for i in positions])
    axes.set_xticks(positions, [series.label for series in series_list], rotation=20, ha="right", fontsize="small")


def machine_description() -> str:
    """The machine this process runs on, in the words docs use (cores, accelerator)."""
    import os

    cores = os.cpu_count() or 0
    accelerator = "GPU" if torch.cuda.is_available() else "no GPU"
    return f"{cores}-core CPU ({platform.machine()}), {accelerator}, torch {torch.__version__}"
