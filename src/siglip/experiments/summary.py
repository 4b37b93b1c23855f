"""From a study's trials and outcomes to its report: the shared tables and plots, the verdict lines, results.json.

Every study gets the same core: the verdict table (each claim's per-seed differences, 95% interval and verdict), the
arms table and the per-task table (each with a chance row), a bar chart of the headline metric with chance drawn, and
every trial's numbers in results.json so that anyone can re-analyse a table. A study adds its own tables and plots
through `Study.tables` and `Study.plots`.
"""

from __future__ import annotations

import dataclasses
import math

from siglip.experiments.design import HEADLINE, LOCKED, Arm, Results, Study
from siglip.experiments.report import Plot, Report, Series, Table
from siglip.experiments.runner import Outcome, chance_of, values
from siglip.experiments.stats import CONFIDENCE, t_interval

CURVE_POINTS = 400
"""Per-step curves in results.json are averaged over windows down to at most this many points."""


def format_mean(numbers: list[float], *, percent: bool = False, digits: int = 1) -> str:
    """'mean ± sd' over seeds (just the value for one seed); percent multiplies by 100; NaN reads "diverged"."""
    if not numbers or any(math.isnan(number) for number in numbers):
        return "diverged" if numbers else "-"
    factor = 100.0 if percent else 1.0
    mean = sum(numbers) / len(numbers)
    if len(numbers) == 1:
        return f"{mean * factor:.{digits}f}"
    spread = math.sqrt(sum((number - mean) ** 2 for number in numbers) / (len(numbers) - 1))
    return f"{mean * factor:.{digits}f} ± {spread * factor:.{digits}f}"


def format_interval(outcome: Outcome) -> tuple[str, str]:
    """('+1.2', '[+0.3, +2.1]') in the comparison's units; the interval is '-' for a single seed."""
    factor = 100.0 if outcome.comparison.percent else 1.0
    interval = outcome.interval
    if math.isnan(interval.mean):
        return "-", "-"
    if interval.n < 2:
        return f"{factor * interval.mean:+.1f}", "-"
    return f"{factor * interval.mean:+.1f}", f"[{factor * interval.low:+.1f}, {factor * interval.high:+.1f}]"


def describe(arm: Arm) -> str:
    """An arm's setting in a few words: loss, batch, steps, start of t and b, tower, and anything unusual."""
    words = [arm.loss if arm.objective is None else type(arm.objective).__name__, f"B={arm.batch_size}",
             f"{arm.steps} steps", f"t0={arm.init_logit_scale:g}"]
    if arm.loss == "sigmoid" or arm.objective is not None:
        words.append(f"b0={arm.logit_bias_at_start():.2f}" + ("" if arm.learn_logit_bias else " (fixed)"))
    if arm.image_tower == LOCKED:
        words.append("locked tower")
    if arm.beta2 != 0.95:
        words.append(f"beta2={arm.beta2:g}")
    if arm.lr != 1e-3:
        words.append(f"lr={arm.lr:g}")
    if arm.data is not None:
        words.append(arm.data)
    if not arm.positive_ids:
        words.append("diagonal labels")
    return ", ".join(words)


def verdict_table(outcomes: list[Outcome], seeds: int) -> Table:
    rows = []
    for outcome in outcomes:
        mean, interval = format_interval(outcome)
        rows.append([outcome.comparison.claim, mean, interval, outcome.verdict, outcome.reason])
    return Table("Claims tested: paired differences over seeds", ["claim", "mean difference",
                                                                   f"{100 * CONFIDENCE:.0f}% interval", "verdict",
                                                                   "why"], rows,
                 note=f"Each difference is taken seed by seed between arms that share their initial weights and "
                      f"their data order; the interval is Student's t over the {seeds} seeds' differences. "
                      "Differences of accuracies are in points (x100).")


def verdict_lines(outcomes: list[Outcome]) -> list[str]:
    lines = []
    for outcome in outcomes:
        mean, interval = format_interval(outcome)
        unit = " points" if outcome.comparison.percent else ""
        shown = f"mean difference {mean}{unit}"
        shown += f", {100 * CONFIDENCE:.0f}% interval {interval}" if interval != "-" else ""
        lines.append(f"**{outcome.verdict}**: {outcome.comparison.claim} ({shown}; {outcome.reason}).")
    return lines


def arms_table(study: Study, results: Results) -> Table:
    """Each arm's headline, retrieval and final loss, mean ± sd over seeds, with a chance row per source."""
    columns = ["arm", "setting", f"{HEADLINE} %", "image->text R@1 %", "text->image R@1 %", "final loss"]
    rows = []
    for source, arms in arms_by_source(study).items():
        first = arms[0].name
        rows.append([f"chance ({source})", "a model that learned nothing",
                     f"{100 * chance_of(results, first):.1f}", f"{100 * chance_of(results, first, 'i2t_r1'):.1f}",
                     f"{100 * chance_of(results, first, 't2i_r1'):.1f}", "-"])
        for arm in arms:
            rows.append([arm.name, describe(arm), format_mean(values(results, arm.name, HEADLINE), percent=True),
                         format_mean(values(results, arm.name, "i2t_r1"), percent=True),
                         format_mean(values(results, arm.name, "t2i_r1"), percent=True),
                         format_mean(values(results, arm.name, "final_loss"), digits=3)])
    return Table("Arms: held-out quality", columns, rows,
                 note=f"Mean ± standard deviation over {len(study.seeds)} seed(s). {HEADLINE}: zero-shot accuracy on "
                      "the held-out split averaged over the tasks with headroom (for shapes: shape and count; colour "
                      "is reported below, not averaged in). Final loss: mean of the last twentieth of the steps "
                      "(losses of different objectives are not comparable).")


def task_table(study: Study, results: Results) -> Table:
    """Zero-shot accuracy of every task for every arm, chance first."""
    tasks: dict[str, float] = {}
    for trials in results.values():
        for key, value in trials[0].chance.items():
            if key.startswith("zeroshot/"):
                tasks.setdefault(key.split("/", 1)[1], value)
    rows = [["chance", *(f"{100 * chance:.1f}" for chance in tasks.values())]]
    for arm in study.arms:
        rows.append([arm.name, *(format_mean(values(results, arm.name, f"zeroshot/{task}"), percent=True)
                                 for task in tasks)])
    return Table("Zero-shot accuracy by task (%)", ["arm", *tasks], rows,
                 note="Held-out split: for shapes, colour and shape of the ten colour-shape pairs never seen in "
                      "training, and the object count. A '-' marks a task the arm's source does not have.")


def arms_by_source(study: Study) -> dict[str, list[Arm]]:
    groups: dict[str, list[Arm]] = {}
    for arm in study.arms:
        groups.setdefault(arm.data or study.scale.data, []).append(arm)
    return groups


def headline_bars(study: Study, results: Results) -> list[Plot]:
    """A bar per arm (mean, with its 95% interval), one chart per source, chance drawn."""
    plots = []
    for source, arms in arms_by_source(study).items():
        series = []
        for arm in arms:
            interval = t_interval(values(results, arm.name, HEADLINE))
            spread = 0.0 if interval.n < 2 or math.isnan(interval.low) else 100 * interval.half_width
            series.append(Series(arm.name, [len(series)], [100 * interval.mean], [spread]))
        plots.append(Plot(f"{HEADLINE}_{source}.png", f"{source}: {HEADLINE} accuracy by arm (95% intervals)", "",
                          f"{HEADLINE} accuracy (%)", series, chance=100 * chance_of(results, arms[0].name),
                          bars=True))
    return plots


def downsample(curve: list[float], points: int = CURVE_POINTS) -> tuple[list[float], int]:
    """Window means of `curve` so that at most `points` remain; returns them and the window length (stride)."""
    stride = max(1, math.ceil(len(curve) / points))
    means = [sum(curve[start:start + stride]) / len(curve[start:start + stride])
             for start in range(0, len(curve), stride)]
    return [round(value, 5) for value in means], stride


def results_json(study: Study, results: Results, outcomes: list[Outcome], command: str) -> dict:
    """Every trial's numbers and every comparison's per-seed differences, for results.json."""
    trials = []
    for arm in study.arms:
        for result in results[arm.name]:
            curves = {}
            for name, curve in result.curves.items():
                points, stride = downsample(curve)
                curves[name] = {"stride": stride, "values": points}
            trials.append({"arm": result.arm, "seed": result.seed, "metrics": result.metrics,
                           "chance": result.chance, "seconds": round(result.seconds, 1), "diverged": result.diverged,
                           "order_digest": result.order_digest, "load_average": result.load_average,
                           "curves": curves})
    return {
        "study": study.name, "title": study.title, "command": command, "smoke": study.smoke,
        "seeds": list(study.seeds), "scale": dataclasses.asdict(study.scale),
        "tower": dataclasses.asdict(study.tower) if study.tower is not None else None,
        "arms": [arm_settings(arm) for arm in study.arms], "trials": trials,
        "comparisons": [{"claim": outcome.comparison.claim, "plus": list(outcome.comparison.plus),
                         "minus": list(outcome.comparison.minus), "metric": outcome.comparison.metric,
                         "margin": outcome.comparison.margin, "differences": outcome.differences,
                         "mean": outcome.interval.mean, "low": outcome.interval.low, "high": outcome.interval.high,
                         "verdict": outcome.verdict, "reason": outcome.reason} for outcome in outcomes],
    }


def arm_settings(arm: Arm) -> dict:
    """An arm as JSON: its fields, with objective and corruption named by their class."""
    settings = {f.name: getattr(arm, f.name) for f in dataclasses.fields(arm)}
    for key in ("objective", "corruption"):
        part = settings[key]
        settings[key] = None if part is None else {"type": type(part).__name__, **dataclasses.asdict(part)}
    settings["init_logit_bias"] = arm.logit_bias_at_start()
    return settings


def build_report(study: Study, results: Results, outcomes: list[Outcome], *, command: str,
                 setup: list[str]) -> Report:
    """The report of a finished study (wall time and load are filled in by the caller)."""
    paper = []
    for figure in study.paper:
        table = Table("", figure.columns, figure.rows, note=figure.note) if figure.columns else None
        paper.append((figure.source, table, figure.plot))
    tables = [verdict_table(outcomes, len(study.seeds)), arms_table(study, results), task_table(study, results)]
    tables += study.tables(study, results) if study.tables is not None else []
    plots = headline_bars(study, results) + (study.plots(study, results) if study.plots is not None else [])
    return Report(study=study.name, title=study.title, claim=study.claim, verdicts=verdict_lines(outcomes),
                  scope=study.scope, setup=setup, paper=paper, tables=tables, plots=plots,
                  results=results_json(study, results, outcomes, command), smoke=study.smoke)
