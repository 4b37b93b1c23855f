"""Several positives per row: diagonal labels against id labels (issue #10), on `digits` and on `shapes`.

Not a study of the paper. Zhai et al. (2023) label a batch with the identity: +1 on the diagonal, -1 elsewhere.
Our small worlds repeat matching pairs inside a batch (ten digit classes share a batch of 128; `shapes` repeats its
simple scenes), and the identity labels call every such repeat a negative. `positive_ids` labels pair (i, j) a
positive when `Sample.positive_id` of i and j are equal (the class for `digits`, the normalised caption's hash for
`shapes`). Each trial is the shared runner's (`experiments.common.run_trial`) with `Trial.use_positive_ids` off or on;
the report also counts, from the very batches the trials see, how many off-diagonal positives a batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from siglip.experiments.common import (
    PreparedData,
    StudyConfig,
    Trial,
    TrialResult,
    batch_indices,
    compare,
    log,
    per_task_table,
    prepare_data,
    run_trial,
    setup_lines,
    values,
)
from siglip.experiments.negatives import pair_labels
from siglip.experiments.report import Plot, Report, Series, Table, format_mean, mean_and_spread

CLAIM = (
    "Not a claim of the paper: Zhai et al. (2023) train on WebLI, where two matching pairs rarely share a batch, and "
    "always label the diagonal alone as positive; they do not study duplicates. The claim under test is ours (issue "
    "#10): counting a batch's duplicates (the same caption, or the same class, under several images) as negatives "
    "teaches the model to push apart what matches, so labelling every pair with equal ids as a positive should help, "
    "and help most where duplicates are many: on `digits` (ten classes in a batch of 128) more than on `shapes`."
)

LABELS = {"diagonal": False, "ids": True}
"""Row label -> `Trial.use_positive_ids`."""

METRICS = (("accuracy", "zero-shot %"), ("i2t_r1", "image->text R@1 %"), ("t2i_r1", "text->image R@1 %"))


def off_diagonal_positives(ids: torch.Tensor) -> int:
    """Pairs (i, j) with i != j and equal ids: the positives that diagonal labels count as negatives.

    Args:
        ids: (n,) integer ids of one batch.

    Returns:
        The count, between 0 (all distinct) and n (n - 1) (all equal); ordered pairs, so each duplicate pair counts
        twice, once as (image i, text j) and once as (image j, text i), as both enter the loss.
    """
    return int(pair_labels(ids.shape[0], ids).sum()) - ids.shape[0]


def duplicates_per_batch(data: PreparedData, batch_size: int, steps: int, seed: int) -> tuple[float, float]:
    """Mean off-diagonal positives per batch over the batches a trial of `seed` sees, by id and by identical caption.

    Returns:
        (pairs with equal `positive_id`, pairs with identical caption tokens), each averaged over `steps` batches.
    """
    caption_groups = data.input_ids.unique(dim=0, return_inverse=True)[1]      # (N,) one id per distinct caption
    by_id, by_caption = 0, 0
    for step in range(steps):
        index = batch_indices(step, batch_size, data.pixel_values.shape[0], seed)
        by_id += off_diagonal_positives(data.positive_ids[index])
        by_caption += off_diagonal_positives(caption_groups[index])
    return by_id / steps, by_caption / steps


@dataclass
class PositivesConfig(StudyConfig):
    sources: tuple[str, ...] = ("digits", "shapes")
    """Sources run one after the other, each with its own data per seed."""
    batch_size: int = 128
    steps: int = 200
    """Steps per trial: 18 trials of 200 steps at 0.33-0.45 s a step (batch 128, one thread, beside other jobs) take
    about 23 minutes (see docs/experiments.md)."""
    softmax_sources: tuple[str, ...] = ("digits",)
    """Sources on which the softmax loss is run too (a second, smaller table); empty skips it."""


def default_config(smoke: bool) -> PositivesConfig:
    if smoke:
        return PositivesConfig(
            smoke=True, corpus_size=256, seeds=(0,), batch_size=16, steps=3, pool_size=64, test_size=64,
        )
    return PositivesConfig()


def run(config: PositivesConfig) -> Report:
    """Per source and seed: the duplicate count, then one trial per label scheme (and loss)."""
    # results[loss][source][label] -> one TrialResult per seed
    results: dict[str, dict[str, dict[str, list[TrialResult]]]] = {"sigmoid": {}, "softmax": {}}
    duplicates: dict[str, tuple[list[float], list[float]]] = {}
    for spec in config.sources:
        losses = ["sigmoid"] + (["softmax"] if spec in config.softmax_sources else [])
        for loss in losses:
            results[loss][spec] = {label: [] for label in LABELS}
        duplicates[spec] = ([], [])
        for seed in config.seeds:
            data = prepare_data(config, seed, spec=spec)
            by_id, by_caption = duplicates_per_batch(data, config.batch_size, config.steps, seed)
            duplicates[spec][0].append(by_id)
            duplicates[spec][1].append(by_caption)
            log(f"positives: {spec} seed {seed}, {by_id:.0f} off-diagonal positives per batch of {config.batch_size}")
            for loss in losses:
                for label, use_ids in LABELS.items():
                    trial = Trial(name=f"{spec}, {loss}, {label}", batch_size=config.batch_size, steps=config.steps,
                                  seed=seed, loss=loss, lr=config.lr, weight_decay=config.weight_decay,
                                  use_positive_ids=use_ids)
                    results[loss][spec][label].append(run_trial(trial, data, config))

    tables = [_duplicates_table(config, duplicates)]
    for loss in ("sigmoid", "softmax"):
        if results[loss]:
            tables.append(_quality_table(config, loss, results[loss]))
    for spec, by_label in results["sigmoid"].items():
        if _task_count(by_label) > 1:                # digits' one task is the zero-shot column already
            tables.append(per_task_table(f"{spec}, sigmoid loss: zero-shot accuracy by task", by_label))
    return Report(
        study="positives",
        title="Several positives per row: diagonal labels vs id labels",
        claim=CLAIM,
        verdict=_verdict(results, duplicates),
        setup=setup_lines(
            replace(config, data=", ".join(config.sources)),
            f"Sources: {', '.join(config.sources)}; batch {config.batch_size}, {config.steps} steps per trial; sigmoid "
            f"loss (t = 10, b = -log batch) with diagonal labels and with id labels (`positive_ids`: the class for "
            f"digits, the normalised caption's hash for shapes); the softmax loss (t = 1/0.07) likewise on "
            f"{', '.join(config.softmax_sources) or 'no source'}. Every run of a seed sees the same batches; "
            "digits has 1,397 training images (its fixed split), so its pool holds at most those.",
        ),
        tables=tables,
        plots=[_plot(spec, results, metric, title) for spec in config.sources for metric, title in METRICS[:2]],
        smoke=config.smoke,
    )


def _task_count(by_label: dict[str, list[TrialResult]]) -> int:
    return sum(key.startswith("chance/") for key in next(iter(by_label.values()))[0].metrics)


def _duplicates_table(config: PositivesConfig, duplicates: dict[str, tuple[list[float], list[float]]]) -> Table:
    pairs = config.batch_size * (config.batch_size - 1)
    rows = []
    for spec, (by_id, by_caption) in duplicates.items():
        rows.append([
            spec,
            format_mean(by_id, digits=0),
            format_mean([count / pairs for count in by_id], percent=True, digits=2),
            format_mean([count / config.batch_size for count in by_id], digits=1),
            format_mean(by_caption, digits=0),
        ])
    return Table(
        f"Off-diagonal positives in a batch of {config.batch_size}",
        ["source", "pairs i != j with equal ids", f"% of the {pairs} off-diagonal pairs", "per row",
         "pairs i != j with identical captions"],
        rows,
        note=f"Counted over the {config.steps} batches each trial sees (ordered pairs: (i, j) and (j, i) both count); "
             "mean ± standard deviation over seeds. Diagonal labels call every one of these pairs a negative.",
    )


def _quality_table(config: PositivesConfig, loss: str, by_source: dict[str, dict[str, list[TrialResult]]]) -> Table:
    rows = []
    for spec, by_label in by_source.items():
        for label, runs in by_label.items():
            rows.append([spec, label, *(format_mean(values(runs, key), percent=True) for key, _ in METRICS),
                         format_mean([run.seconds for run in runs], digits=0)])
    return Table(
        f"{loss.capitalize()} loss: held-out quality with diagonal and with id labels",
        ["source", "labels", *(title for _, title in METRICS), "seconds per trial"],
        rows,
        note=f"Batch {config.batch_size}, {config.steps} steps; mean ± standard deviation over {len(config.seeds)} "
             "seed(s); zero-shot is the mean over the source's tasks. R@1 counts identical held-out captions as one "
             "another's match; on digits a caption's template is drawn at random, so an image cannot know which of "
             "the six templates its caption used: R@1 there is expected near a sixth of the class accuracy whatever "
             "the labels.",
    )


def _plot(spec: str, results: dict, metric: str, title: str) -> Plot:
    series = []
    for loss, by_source in results.items():
        for label, runs in by_source.get(spec, {}).items():
            mean, spread = mean_and_spread(values(runs, metric))
            series.append(Series(f"{loss}, {label}", [0], [100 * mean], [100 * spread]))
    return Plot(f"{spec}_{metric}.png", f"{spec}: {title}", "", title, series, bars=True)


def _verdict(results: dict, duplicates: dict[str, tuple[list[float], list[float]]]) -> str:
    lines, gains = [], {}
    for loss, by_source in results.items():
        for spec, by_label in by_source.items():
            parts = []
            for key, title in METRICS:
                difference, _, word = compare(values(by_label["ids"], key), values(by_label["diagonal"], key))
                parts.append(f"{title.replace(' %', '')} {100 * difference:+.1f} points ({word})")
                if loss == "sigmoid" and key == "accuracy":
                    gains[spec] = (difference, word)
            per_batch = mean_and_spread(duplicates[spec][0])[0]
            lines.append(f"- {spec}, {loss} loss ({per_batch:.0f} off-diagonal positives per batch), ids minus "
                         f"diagonal: {'; '.join(parts)}.")
    summary = _summary(gains, duplicates)
    return "\n".join([summary, "", *lines])


def _summary(gains: dict[str, tuple[float, str]], duplicates: dict[str, tuple[list[float], list[float]]]) -> str:
    """One sentence on the sigmoid loss's zero-shot accuracy: where do id labels help, and is it where duplicates are
    most frequent?"""
    if not gains:
        return "No sigmoid runs."
    most = max(gains, key=lambda spec: mean_and_spread(duplicates[spec][0])[0])
    difference, word = gains[most]
    others = {spec: gain for spec, gain in gains.items() if spec != most}
    if word.startswith("higher"):
        if all(difference > other for other, _ in others.values()):
            return (f"Holds at this scale: with the sigmoid loss, id labels raise zero-shot accuracy on {most}, the "
                    "source with the most duplicates per batch, and by more than on "
                    f"{', '.join(others) or 'any other source'}.")
        return (f"Partly holds: id labels raise zero-shot accuracy on {most}, the source with the most duplicates per "
                "batch, but not by more than elsewhere.")
    if word.startswith("lower"):
        return f"Does not hold at this scale: id labels lower zero-shot accuracy on {most} ({word})."
    return (f"Not shown at this scale: on {most}, the source with the most duplicates per batch, id labels change "
            f"zero-shot accuracy by {100 * difference:+.1f} points, {word}.")
