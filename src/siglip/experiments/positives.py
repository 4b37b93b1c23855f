"""Study (ours, issue #10, not the paper's): several positives per row, diagonal labels against id labels.

Zhai et al. (2023) label a batch with the identity: +1 on the diagonal, -1 elsewhere. Our small worlds repeat matching
pairs inside a batch (ten digit classes share a batch of 128; `shapes` repeats its simple scenes), and the identity
labels call every such repeat a negative. `positive_ids` labels pair (i, j) a positive when `Sample.positive_id` of i
and j are equal (the class for `digits`, the normalised caption's hash for `shapes`). Each arm differs from its
partner only in `Arm.positive_ids`; every trial also counts the off-diagonal positives of the batches it sees.
"""

from __future__ import annotations

from siglip.experiments.design import Arm, Comparison, PaperFigure, Results, Scale, Study
from siglip.experiments.report import Table
from siglip.experiments.summary import format_mean

CLAIM = (
    "Not a claim of the paper: Zhai et al. (2023) train on WebLI, where two matching pairs rarely share a batch, and "
    "always label the diagonal alone as positive. The claim under test is ours (issue #10): counting a batch's "
    "duplicates (the same caption, or the same class, under several images) as negatives teaches the model to push "
    "apart what matches, so labelling every pair with equal ids as a positive should help, and help most where "
    "duplicates are many: on `digits` (ten classes in a batch of 128) more than on `shapes`."
)

PAPER = PaperFigure(source="The paper has no figure for this: its Algorithm 1 labels the diagonal alone (`labels = "
                           "2 * eye(n) - ones(n)`), and it does not study duplicates within a batch.")

SETTINGS = (("digits", "sigmoid"), ("shapes", "sigmoid"), ("digits", "softmax"))


def arm_name(source: str, loss: str, labels: str) -> str:
    return f"{source}, {loss}, {labels}"


def study(smoke: bool) -> Study:
    """digits and shapes, batch 128, 300 steps, 4 seeds; smoke: batch 16, 3 steps, 2 seeds."""
    batch, steps = (16, 3) if smoke else (128, 300)
    arms = [Arm(arm_name(source, loss, labels), batch, steps, loss=loss, data=source, positive_ids=labels == "ids")
            for source, loss in SETTINGS for labels in ("diagonal", "ids")]
    comparisons = [Comparison(f"{source}, {loss} loss: id labels beat diagonal labels",
                              plus=(arm_name(source, loss, "ids"),), minus=(arm_name(source, loss, "diagonal"),))
                   for source, loss in SETTINGS]
    comparisons.append(Comparison(
        "sigmoid loss: id labels gain more on digits (many duplicates) than on shapes (few)",
        plus=(arm_name("digits", "sigmoid", "ids"), arm_name("shapes", "sigmoid", "diagonal")),
        minus=(arm_name("digits", "sigmoid", "diagonal"), arm_name("shapes", "sigmoid", "ids"))))
    scope = (
        f"Tested: the two label schemes on the two built-in worlds, batch {batch}, {steps} steps, the sigmoid loss on "
        "both and the softmax loss on digits, every pair of arms sharing its seeds' weights and batches. Not "
        "tested: web data, where equal captions in a batch are rare and the difference should vanish. The headline "
        "is digits' digit accuracy (chance 10%) and shapes' shape-and-count mean (chance 25%), so the two sources' "
        "gains are in different units: the last comparison is a rough one."
    )
    return Study(name="positives", title="Several positives per row: diagonal labels vs id labels", claim=CLAIM,
                 paper=[PAPER], arms=arms, comparisons=comparisons, scope=scope,
                 seeds=(0, 1) if smoke else (0, 1, 2, 3),
                 scale=Scale(corpus_size=256, pool_size=64, test_size=64) if smoke else Scale(),
                 setup=[f"Sources digits and shapes, batch {batch}, {steps} steps per arm; the sigmoid loss (t = 10, "
                        "b at -log(B - 1)) with diagonal and with id labels on both, the softmax loss (t = 10) "
                        "likewise on digits; digits has 1,397 training images (its fixed split), so its pool holds "
                        "at most those"],
                 smoke=smoke, tables=duplicates_table)


def duplicates_table(study: Study, results: Results) -> list[Table]:
    """Off-diagonal positives in the batches the arms saw: how many pairs diagonal labels call negatives wrongly."""
    batch = study.arms[0].batch_size
    rows = []
    for source in ("digits", "shapes"):
        trials = results[arm_name(source, "sigmoid", "ids")]
        counts = [trial.metrics["duplicates_per_batch"] for trial in trials]
        rows.append([source, format_mean(counts, digits=0),
                     format_mean([count / (batch * (batch - 1)) for count in counts], percent=True, digits=2),
                     format_mean([count / batch for count in counts], digits=1)])
    return [Table(f"Off-diagonal positives in a batch of {batch}", ["source", "pairs i != j with equal ids",
                                                                     "% of the off-diagonal pairs", "per row"], rows,
                  note="Counted over every batch a trial sees (ordered pairs: (i, j) and (j, i) both count); mean ± "
                       "standard deviation over seeds. Diagonal labels call each of these pairs a negative.")]
