"""Study: robustness to corrupted training pairs (the paper's Section 4.10, Figure 7: label noise).

A fraction p of each training batch is corrupted, in one of four ways:
- "image": the image becomes uniform noise (uniform pixels in [0, 1], then the processor's normalisation);
- "text": the caption's tokens become random non-special tokens, keeping its length and its padding and end token;
- "shuffle": the chosen rows' captions are permuted among themselves with no row keeping its own (a cyclic shift of a
  random order), so every chosen pair is misaligned;
- "all": each of the three above, every one on its own independent draw of p of the rows.
Corrupted rows get fresh positive ids, so the loss is told the corrupted pair is a positive (that is the noise) and
no clean row is paired with it. The rows come from the trial's corruption stream, seeded by the seed alone: the
sigmoid and softmax arms of one seed corrupt the same rows the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from siglip.experiments.design import Arm, Comparison, Corruption, PaperFigure, Results, Scale, Study, TrainBatch
from siglip.experiments.report import Plot, Series
from siglip.experiments.runner import chance_of, values
from siglip.experiments.stats import t_interval

KINDS = ("image", "text", "shuffle", "all")


def choose_rows(n: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """round(fraction * n) distinct row indices, drawn from `generator`, sorted."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return torch.randperm(n, generator=generator)[:round(fraction * n)].sort().values


def corrupt_batch(batch: TrainBatch, kind: str, fraction: float, data, generator: torch.Generator
                  ) -> tuple[TrainBatch, dict[str, torch.Tensor]]:
    """Corrupt `fraction` of the batch's pairs as `kind` says (see the module docstring).

    Args:
        batch: pixel_values (n, 3, S, S), input_ids (n, L), positive_ids (n,); not modified.
        kind: one of KINDS.
        fraction: p in [0, 1]; each corruption touches round(p * n) rows.
        data: anything with `vocab_size`, `special_ids`, `pixel_mean` and `pixel_std` (a `PreparedData`).
        generator: the source of every random choice.

    Returns:
        The corrupted batch, and for each corruption applied the (k,) sorted indices of the rows it touched.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = batch.input_ids.shape[0]
    pixels, ids = batch.pixel_values.clone(), batch.input_ids.clone()
    touched: dict[str, torch.Tensor] = {}
    for part in (("image", "text", "shuffle") if kind == "all" else (kind,)):
        rows = choose_rows(n, fraction, generator)
        touched[part] = rows
        if rows.numel() == 0:
            continue
        if part == "image":
            noise = torch.rand((rows.numel(), *pixels.shape[1:]), generator=generator)
            pixels[rows] = (noise - data.pixel_mean[:, None, None]) / data.pixel_std[:, None, None]
        elif part == "text":
            ids[rows] = random_tokens(ids[rows], data, generator)
        elif rows.numel() > 1:
            order = rows[torch.randperm(rows.numel(), generator=generator)]
            ids[order] = ids[order.roll(-1)]     # each chosen row takes the next one's caption: no fixed point
    corrupted = torch.zeros(n, dtype=torch.bool)
    for rows in touched.values():
        corrupted[rows] = True
    return TrainBatch(pixels, ids, fresh_ids(batch.positive_ids, corrupted)), touched


def random_tokens(input_ids: torch.Tensor, data, generator: torch.Generator) -> torch.Tensor:
    """(k, L) captions whose non-special tokens are replaced by uniformly random non-special tokens.

    Special tokens (padding, the end token the text tower pools) stay where they are, so length and layout hold.
    """
    allowed = torch.ones(data.vocab_size, dtype=torch.bool)
    allowed[data.special_ids[data.special_ids < data.vocab_size]] = False
    pool = allowed.nonzero().squeeze(1)                                   # (v,) drawable token ids
    draw = pool[torch.randint(pool.numel(), input_ids.shape, generator=generator)]
    return torch.where(torch.isin(input_ids, data.special_ids), input_ids, draw)


def fresh_ids(positive_ids: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """Relabel ids to 0..u-1 (same equalities among clean rows) and give each corrupted row a new id of its own."""
    _, compact = positive_ids.unique(return_inverse=True)
    unique_count = int(compact.max()) + 1 if compact.numel() else 0
    out = compact.clone()
    out[corrupted] = unique_count + torch.arange(int(corrupted.sum()))
    return out


@dataclass(frozen=True)
class Corrupt(Corruption):
    """`corrupt_batch` applied to every training batch."""

    kind: str
    fraction: float

    def __call__(self, batch: TrainBatch, data, generator: torch.Generator) -> TrainBatch:
        return corrupt_batch(batch, self.kind, self.fraction, data, generator)[0]


CLAIM = (
    "Zhai et al. (2023), Section 4.10 and Figure 7: when a growing fraction of training pairs is corrupted (image "
    "noise, random text, shuffled batch alignment, and these together), models trained with the sigmoid loss are "
    "increasingly robust: they keep their lead over the softmax loss as the corruption grows."
)

PAPER = PaperFigure(
    source="Zhai et al. (2023), Figure 7 and appendix E: M/16 image and M text towers from scratch, batch 16,384, "
           "3.6B examples seen, peak lr 1e-3 with 10% warm-up; ImageNet zero-shot accuracy (chance 0.1%) against the "
           "corruption probability. The paper prints no numbers; read from its axes:",
    columns=["panel", "corruption probability (x axis)", "ImageNet 0-shot (y axis)", "what it shows"],
    rows=[["image; text; batch alignment", "0 to about 0.5", "0.50-0.56 for every panel",
           "sigmoid above softmax at every probability"],
          ["image & text; image, text & batch", "0 to about 0.25", "0.50-0.56",
           "sigmoid above softmax at every probability"]],
    note="Effects of a few points on ImageNet: the whole y range of the figure is 6 points.",
)


def arm_name(loss: str, kind: str) -> str:
    return f"{loss}, {kind}"


def study(smoke: bool) -> Study:
    """Batch 128, 350 steps, p = 0.5 for one corruption and 0.25 for all three, 4 seeds; smoke: 2 steps, 2 seeds."""
    batch, steps = (16, 3) if smoke else (128, 350)
    fractions = {"image": 0.5, "text": 0.5, "shuffle": 0.5, "all": 0.25}
    kinds = ("image", "all") if smoke else ("image", "shuffle", "all")
    arms = []
    for loss in ("sigmoid", "softmax"):
        arms.append(Arm(arm_name(loss, "clean"), batch, steps, loss=loss))
        arms += [Arm(arm_name(loss, kind), batch, steps, loss=loss, corruption=Corrupt(kind, fractions[kind]))
                 for kind in kinds]
    comparisons = []
    for kind in kinds:
        noisy_sigmoid, noisy_softmax = arm_name("sigmoid", kind), arm_name("softmax", kind)
        clean_sigmoid, clean_softmax = arm_name("sigmoid", "clean"), arm_name("softmax", "clean")
        comparisons += [
            Comparison(f"{kind} (p = {fractions[kind]:g}): the sigmoid loss loses less accuracy than the softmax",
                       plus=(noisy_sigmoid, clean_softmax), minus=(clean_sigmoid, noisy_softmax)),
            Comparison(f"{kind} (p = {fractions[kind]:g}): sigmoid beats softmax on corrupted data",
                       plus=(noisy_sigmoid,), minus=(noisy_softmax,)),
        ]
    comparisons.append(Comparison("clean data: sigmoid minus softmax", plus=(arm_name("sigmoid", "clean"),),
                                  minus=(arm_name("softmax", "clean"),), predicted=False))
    scope = (
        f"Tested: three of the paper's five corruptions (image noise and shuffled pairs at p = 0.5, the three "
        f"together at p = 0.25 each, the ends of the paper's x axes) against clean data, both losses from t = 10, "
        f"batch {batch}, {steps} steps: long enough for the clean arms to learn shape and count well above chance, "
        "so that a drop can show. Not run: text-only noise and image & text (they are part of 'all'), and the "
        "smaller probabilities, to keep the 8 arms x 4 seeds within an hour on 2 cores; nor the paper's scale "
        "(3.6B examples at batch 16k)."
    )
    return Study(name="noise", title="Corrupted training pairs: sigmoid vs softmax", claim=CLAIM, paper=[PAPER],
                 arms=arms, comparisons=comparisons, scope=scope, seeds=(0, 1) if smoke else (0, 1, 2, 3),
                 scale=Scale(corpus_size=256, pool_size=64, test_size=64) if smoke else Scale(),
                 setup=[f"Batch {batch}, {steps} steps per arm; both losses start at t = 10 (the sigmoid's bias at "
                        "-log(B - 1)); corruptions as in `siglip.experiments.noise`, drawn from a stream seeded by "
                        "the seed alone, so both losses of a seed see the same corrupted rows"],
                 smoke=smoke, plots=lambda study, results: [noise_plot(study, results, kinds)])


def noise_plot(study: Study, results: Results, kinds: tuple[str, ...]) -> Plot:
    """Headline accuracy per corruption for both losses, clean first, chance drawn."""
    labels = ("clean", *kinds)
    series = []
    for loss in ("sigmoid", "softmax"):
        intervals = [t_interval(values(results, arm_name(loss, kind), "zeroshot")) for kind in labels]
        series.append(Series(loss, list(range(len(labels))), [100 * i.mean for i in intervals],
                             [100 * i.half_width if i.n > 1 else 0.0 for i in intervals]))
    return Plot("by_corruption.png", "zeroshot accuracy by corruption (95% intervals)", "training pairs",
                "zeroshot accuracy (%)", series, chance=100 * chance_of(results, study.arms[0].name),
                xticklabels=list(labels))
