"""Sigmoid against softmax across batch sizes at equal examples seen: the design the `batch-size` (both towers from
scratch, the paper's SigLIP) and `siglit` (a locked pretrained image tower) studies share.

Both losses start from the same temperature (t = 10) so that the comparison is not also one of temperatures (Adam
moves t' by about the learning rate per step, so a short run keeps t near its start); the sigmoid's bias starts at
the prior of its batch, -log(B - 1). Every arm sees the same number of examples, in the same order for a given seed,
so a batch of B runs examples / B steps; the number of examples is chosen so that the largest batch still takes
enough steps to learn (the paper's Figure 3: a large batch needs a long enough schedule).
"""

from __future__ import annotations

from siglip.experiments.design import HEADLINE, SCRATCH, Arm, Comparison, PaperFigure, Results, Scale, Study, TowerSpec
from siglip.experiments.report import Plot, Series, Table
from siglip.experiments.runner import chance_of, values
from siglip.experiments.stats import paired_differences, t_interval
from siglip.experiments.summary import format_mean

LOSSES = ("sigmoid", "softmax")


def arm_name(loss: str, batch: int) -> str:
    return f"{loss}, batch {batch}"


def by_batch_study(*, name: str, title: str, claim: str, paper: list[PaperFigure], scope: str,
                   batches: tuple[int, ...], examples: int, image_tower: str = SCRATCH, tower: TowerSpec | None = None,
                   seeds: tuple[int, ...], scale: Scale, smoke: bool) -> Study:
    """A sigmoid-vs-softmax study over `batches`, each arm seeing `examples` training examples.

    Its comparisons: sigmoid beats softmax at the smallest batch; the sigmoid's lead is larger at the smallest batch
    than at the largest (a difference of differences, paired by seed); and, for reference, the difference at the
    largest batch (the paper reports the two close there, which an interval can show but not prove).
    """
    arms = [Arm(arm_name(loss, batch), batch, max(1, examples // batch), loss=loss, image_tower=image_tower)
            for batch in batches for loss in LOSSES]
    small, large = min(batches), max(batches)
    comparisons = [
        Comparison(f"sigmoid beats softmax at batch {small}", plus=(arm_name("sigmoid", small),),
                   minus=(arm_name("softmax", small),)),
        Comparison(f"the sigmoid's lead is larger at batch {small} than at batch {large}",
                   plus=(arm_name("sigmoid", small), arm_name("softmax", large)),
                   minus=(arm_name("softmax", small), arm_name("sigmoid", large))),
        Comparison(f"sigmoid minus softmax at batch {large}", plus=(arm_name("sigmoid", large),),
                   minus=(arm_name("softmax", large),), predicted=False),
    ]
    setup = [f"Batches {', '.join(map(str, batches))}; {examples} training examples per arm (steps = examples / "
             "batch), the same samples in the same order for every arm of a seed; both losses start at t = 10, the "
             "sigmoid's bias at -log(B - 1)"]
    return Study(name=name, title=title, claim=claim, paper=paper, arms=arms, comparisons=comparisons, scope=scope,
                 seeds=seeds, scale=scale, tower=tower, setup=setup, smoke=smoke, tables=batch_table,
                 plots=batch_plot)


def batches_of(study: Study) -> list[int]:
    return sorted({arm.batch_size for arm in study.arms})


def batch_table(study: Study, results: Results) -> list[Table]:
    """Headline by batch for each loss, and the paired sigmoid-minus-softmax difference with its interval."""
    rows = [["chance", "-", *[f"{100 * chance_of(results, study.arms[0].name):.1f}"] * 2, "-", "-"]]
    for batch in batches_of(study):
        sigmoid, softmax = (values(results, arm_name(loss, batch), HEADLINE) for loss in LOSSES)
        interval = t_interval(paired_differences(sigmoid, softmax))
        rows.append([str(batch), str(study.arm(arm_name("sigmoid", batch)).steps),
                     format_mean(sigmoid, percent=True), format_mean(softmax, percent=True),
                     f"{100 * interval.mean:+.1f}",
                     f"[{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]" if interval.n > 1 else "-"])
    return [Table(f"{HEADLINE} accuracy by batch size", ["batch", "steps", "sigmoid %", "softmax %",
                                                          "sigmoid - softmax", "95% interval"], rows,
                  note="Mean ± standard deviation over seeds; the difference is paired by seed.")]


def batch_plot(study: Study, results: Results) -> list[Plot]:
    batches = batches_of(study)
    series = []
    for loss in LOSSES:
        intervals = [t_interval(values(results, arm_name(loss, batch), HEADLINE)) for batch in batches]
        series.append(Series(loss, [float(batch) for batch in batches], [100 * i.mean for i in intervals],
                             [100 * i.half_width if i.n > 1 else 0.0 for i in intervals]))
    return [Plot("by_batch.png", f"ours: {HEADLINE} accuracy by batch size (95% intervals)", "batch size",
                 f"{HEADLINE} accuracy (%)", series, chance=100 * chance_of(results, study.arms[0].name), logx=True)]


def paper_curve(filename: str, title: str, batches: list[float], sigmoid: list[float], softmax: list[float]) -> Plot:
    """The paper's ImageNet zero-shot accuracy by batch size (1,000 classes: chance 0.1%)."""
    return Plot(filename, title, "batch size", "ImageNet 0-shot accuracy (%)",
                [Series("sigmoid", batches, sigmoid), Series("softmax", batches, softmax)], chance=0.1, logx=True)
