"""Study 3: how many negatives, and which ones (the paper's study of masked negatives).

Every positive pair is kept; of the negatives only a fixed ratio enters the loss, chosen per batch at random, as the
easiest (lowest logits) or as the hardest (highest logits). "hard, matched pairs" trains longer so that it sees as many
pairs as the run with all negatives. At these batch sizes the full n x n logit matrix is small, so the masked loss is
the literal full-matrix sum of Algorithm 1 restricted to the kept pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from siglip.experiments.common import (
    StudyConfig,
    Trial,
    compare,
    log,
    mean_curve,
    per_task_table,
    prepare_data,
    run_trial,
    setup_lines,
    smooth,
    values,
)
from siglip.experiments.report import Plot, Report, Series, Table, format_mean, mean_and_spread

CLAIM = (
    "Zhai et al. (2023), on how many negatives the sigmoid loss needs: when only a fraction of the negatives is "
    "kept, keeping the easiest ones is worst, keeping random ones also hurts, and keeping the hardest ones nearly "
    "keeps the quality of all negatives, especially when trained for as many seen pairs as the full run."
)

CHOICES = ("random", "easy", "hard")


def masked_sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    keep: torch.Tensor,
    positive_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """-(1/n) sum over kept (i, j) of log sigmoid(z_ij (t <x_i, y_j> + b)): Algorithm 1 on a subset of pairs.

    Args:
        image_features, text_features: (n, d) L2-normalised, row i of each a matching pair.
        logit_scale: t (already exponentiated), 0-d. logit_bias: b, 0-d.
        keep: (n, n) bool, True for pairs that enter the loss.
        positive_ids: (n,) ids, pairs with equal ids are positive; None means the diagonal.

    Returns:
        0-d tensor, normalised by n like the full loss, so keep = all True gives exactly `sigmoid_loss`.
    """
    logits = logit_scale * image_features @ text_features.t() + logit_bias       # (n, n)
    labels = 2.0 * pair_labels(image_features.shape[0], positive_ids, image_features.device).to(logits.dtype) - 1.0
    return -(F.logsigmoid(labels * logits) * keep).sum() / image_features.shape[0]


def pair_labels(n: int, positive_ids: torch.Tensor | None, device: torch.device | None = None) -> torch.Tensor:
    """(n, n) bool: True where image i and text j form a positive pair."""
    if positive_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return positive_ids[:, None] == positive_ids[None, :]


def negative_mask(
    logits: torch.Tensor, positive: torch.Tensor, ratio: float, choice: str, generator: torch.Generator
) -> torch.Tensor:
    """Which pairs to keep: every positive, and round(ratio * negatives) negatives picked as `choice` says.

    Args:
        logits: (n, n) current logits t <x_i, y_j> + b (no gradient needed); a higher logit on a negative is a
            harder negative (larger loss), a lower one an easier negative.
        positive: (n, n) bool from `pair_labels`.
        ratio: fraction of negatives kept, in (0, 1].
        choice: "random" (uniform, from `generator`), "easy" (lowest logits) or "hard" (highest logits).

    Returns:
        (n, n) bool mask; ties among logits are broken by position.
    """
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    negatives = ~positive
    count = int(negatives.sum())
    kept = min(count, max(1, round(ratio * count))) if count else 0
    if choice == "random":
        score = torch.rand(logits.shape, generator=generator).to(logits.device)
    elif choice == "hard":
        score = logits.detach().clone()
    else:
        score = -logits.detach()
    score = score.masked_fill(positive, -torch.inf).flatten()
    keep = positive.clone().flatten()
    if kept:
        keep[score.topk(kept).indices] = True
    return keep.view_as(positive)


def make_masked_loss(ratio: float, choice: str):
    """A loss hook for `Trial.loss_fn` that masks the negatives anew on every batch."""

    def loss(images, texts, scale, bias, ids, generator):
        positive = pair_labels(images.shape[0], ids, images.device)
        with torch.no_grad():
            logits = scale * images @ texts.t() + bias
        keep = negative_mask(logits, positive, ratio, choice, generator)
        return masked_sigmoid_loss(images, texts, scale, bias, keep, ids)

    return loss


def matched_steps(steps: int, batch_size: int, ratio: float) -> int:
    """Steps for a masked run to see as many pairs (positives plus kept negatives) as `steps` with all negatives.

    Counted with diagonal labels: n positives and n (n - 1) negatives per batch of n.
    """
    all_pairs = batch_size * batch_size
    kept_pairs = batch_size + round(ratio * batch_size * (batch_size - 1))
    return round(steps * all_pairs / kept_pairs)


@dataclass
class NegativesConfig(StudyConfig):
    batch_size: int = 128
    steps: int = 250
    ratio: float = 0.25
    """Fraction of negatives kept by the masked runs."""


def default_config(smoke: bool) -> NegativesConfig:
    if smoke:
        return NegativesConfig(
            smoke=True, corpus_size=256, seeds=(0,), batch_size=16, steps=3, pool_size=64, test_size=64,
        )
    return NegativesConfig()


def run(config: NegativesConfig) -> Report:
    """All negatives vs random / easy / hard masking, plus hard with matched pairs; sigmoid loss throughout."""
    longer = matched_steps(config.steps, config.batch_size, config.ratio)
    settings = [("all negatives", None, config.steps)]
    settings += [(f"{choice}, {config.ratio:g} of negatives", choice, config.steps) for choice in CHOICES]
    settings += [(f"hard, {config.ratio:g}, matched pairs", "hard", longer)]
    results = {label: [] for label, _, _ in settings}
    for seed in config.seeds:
        data = prepare_data(config, seed)
        for label, choice, steps in settings:
            log(f"negatives: {label}, {steps} steps")
            hook = None if choice is None else make_masked_loss(config.ratio, choice)
            trial = Trial(name=label, batch_size=config.batch_size, steps=steps, seed=seed, lr=config.lr,
                          weight_decay=config.weight_decay, loss_fn=hook)
            results[label].append(run_trial(trial, data, config))

    rows = [[label, str(steps), format_mean(values(results[label], "accuracy"), percent=True),
             format_mean(values(results[label], "i2t_r1"), percent=True),
             format_mean([r.losses[-1] for r in results[label]], digits=3)] for label, _, steps in settings]
    table = Table("Held-out quality by which negatives are kept",
                  ["negatives", "steps", "zero-shot %", "R@1 %", "final training loss"], rows,
                  note=f"Sigmoid loss, batch {config.batch_size}; positives always kept; mean ± standard deviation "
                       f"over {len(config.seeds)} seed(s). The masked losses sum fewer terms, so their loss values "
                       "are not comparable with the full one.")
    series = []
    for label, _, _ in settings:
        mean, spread = mean_curve([smooth(r.losses, 10) for r in results[label]])
        series.append(Series(label, list(range(len(mean))), mean, spread))
    plot = Plot("loss.png", "training loss (10-step moving average)", "step", "loss", series, logy=True)
    accuracy = {label: values(results[label], "accuracy") for label, _, _ in settings}
    bars = Plot("accuracy.png", "zero-shot accuracy by negatives kept", "", "zero-shot accuracy (%)",
                [Series(label, [index], [100 * mean_and_spread(accuracy[label])[0]],
                        [100 * mean_and_spread(accuracy[label])[1]])
                 for index, (label, _, _) in enumerate(settings)], bars=True)
    return Report(
        study="negatives",
        title="Masking negatives: random, easiest, hardest",
        claim=CLAIM,
        verdict=_verdict(settings, accuracy),
        setup=setup_lines(config, f"Sigmoid loss (t = 10, b = -log batch), batch {config.batch_size}, "
                                  f"{config.steps} steps ({longer} for matched pairs), keep ratio {config.ratio:g} "
                                  "of negatives, chosen globally over the batch's logit matrix each step"),
        tables=[table, per_task_table("Zero-shot accuracy by task", results)],
        plots=[plot, bars],
        smoke=config.smoke,
    )


def _verdict(settings, accuracy: dict[str, list[float]]) -> str:
    full, random_label, easy, hard, matched = (label for label, _, _ in settings)
    lines = []
    for label in (random_label, easy, hard, matched):
        difference, _, word = compare(accuracy[label], accuracy[full])
        lines.append(f"- {label}: {100 * difference:+.1f} points of zero-shot accuracy against all negatives "
                     f"({word}).")
    easy_vs_random = compare(accuracy[easy], accuracy[random_label])[2]
    hard_vs_random = compare(accuracy[hard], accuracy[random_label])[2]
    matched_vs_full = compare(accuracy[matched], accuracy[full])[2]
    checks = [
        ("easy is worse than random", easy_vs_random.startswith("lower")),
        ("hard is better than random", hard_vs_random.startswith("higher")),
        ("hard with matched pairs is not below all negatives", not matched_vs_full.startswith("lower")),
    ]
    held = [text for text, ok in checks if ok]
    failed = [text for text, ok in checks if not ok]
    if not failed:
        summary = "Agrees with the paper at this scale: " + "; ".join(held) + "."
    elif held:
        summary = ("Partly agrees: " + "; ".join(held) + ". Not reproduced at this scale: " + "; ".join(failed)
                   + ".")
    else:
        summary = "Does not reproduce at this scale: " + "; ".join(f"not ({text})" for text in failed) + "."
    return "\n".join([summary, "", *lines])
