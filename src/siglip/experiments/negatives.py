"""Study: how many negatives, and which ones (the paper's Section 4.8, Figure 6: "The effect of batch composition").

The paper runs this in its SigLiT setup: a text tower trained against a locked, pretrained image tower, at batch 16k,
masking negatives to a target positive:negative ratio. So do we: the study's image tower is pretrained once and
cached (`siglip.experiments.tower`), its features computed once per seed, and a text tower trained against them.
Hardness is then measured against a fixed, meaningful image embedding, not against a random start. Every positive
pair is kept; of the negatives a fixed fraction enters the loss, chosen per batch at random, as the easiest (lowest
logits) or the hardest (highest logits, the highest loss). The bias starts at the prior of the kept ratio,
-log(fraction * (B - 1)), since masking changes the positive-to-negative ratio it tracks; one more random arm starts
at the prior of all negatives, so that the claim "the bias rises as negatives are removed" is tested by training, not
by where the arms start. "Hard, matched pairs" trains longer so that it sees as many pairs as the run with all
negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from siglip.experiments.design import (
    LOCKED,
    Arm,
    Comparison,
    Objective,
    PaperFigure,
    Results,
    Scale,
    Study,
    TowerSpec,
    prior_logit_bias,
)
from siglip.experiments.report import Table
from siglip.experiments.summary import format_mean

CHOICES = ("random", "easy", "hard")


def pair_labels(n: int, positive_ids: torch.Tensor | None, device: torch.device | None = None) -> torch.Tensor:
    """(n, n) bool: True where image i and text j form a positive pair (equal ids; the diagonal without ids)."""
    if positive_ids is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return positive_ids[:, None] == positive_ids[None, :]


def masked_sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                        logit_bias: torch.Tensor, keep: torch.Tensor,
                        positive_ids: torch.Tensor | None = None) -> torch.Tensor:
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


def negative_mask(logits: torch.Tensor, positive: torch.Tensor, fraction: float, choice: str,
                  generator: torch.Generator) -> torch.Tensor:
    """Which pairs to keep: every positive, and round(fraction * negatives) negatives picked as `choice` says.

    Args:
        logits: (n, n) current logits t <x_i, y_j> + b; a higher logit on a negative is a harder negative (a larger
            loss), a lower one an easier negative.
        positive: (n, n) bool from `pair_labels`.
        fraction: share of the batch's negatives kept, in (0, 1].
        choice: "random" (uniform, from `generator`), "easy" (lowest logits) or "hard" (highest logits).

    Returns:
        (n, n) bool mask; ties among logits are broken by position.
    """
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = int((~positive).sum())
    kept = min(count, max(1, round(fraction * count))) if count else 0
    if choice == "random":
        score = torch.rand(logits.shape, generator=generator).to(logits.device)
    else:
        score = logits.detach().clone() if choice == "hard" else -logits.detach()
    score = score.masked_fill(positive, -torch.inf).flatten()
    keep = positive.clone().flatten()
    if kept:
        keep[score.topk(kept).indices] = True
    return keep.view_as(positive)


@dataclass(frozen=True)
class MaskedNegatives(Objective):
    """The sigmoid loss over every positive and a `fraction` of the negatives, chosen anew on every batch."""

    fraction: float
    choice: str

    @property
    def kept_negative_fraction(self) -> float:
        return self.fraction

    def __call__(self, inputs) -> torch.Tensor:
        images, texts = inputs.image_features, inputs.text_features
        positive = pair_labels(images.shape[0], inputs.positive_ids, images.device)
        with torch.no_grad():
            logits = inputs.logit_scale * images @ texts.t() + inputs.logit_bias
        keep = negative_mask(logits, positive, self.fraction, self.choice, inputs.generator)
        return masked_sigmoid_loss(images, texts, inputs.logit_scale, inputs.logit_bias, keep, inputs.positive_ids)


def matched_steps(steps: int, batch_size: int, fraction: float) -> int:
    """Steps for a masked run to see as many pairs (positives plus kept negatives) as `steps` with all negatives.

    Counted with diagonal labels: n positives and n (n - 1) negatives per batch of n.
    """
    kept_pairs = batch_size + round(fraction * batch_size * (batch_size - 1))
    return round(steps * batch_size * batch_size / kept_pairs)


CLAIM = (
    "Zhai et al. (2023), Section 4.8 and Figure 6, in the SigLiT setup (locked image tower), batch 16k: when only "
    "part of the negatives is kept, removing them at random hurts, keeping only the easiest does not work at all, "
    "keeping the hardest almost keeps the quality of all negatives, and training the hardest for as many pairs as "
    "the full run does slightly better still. As negatives are removed, the learned bias and the logits rise."
)

PAPER = PaperFigure(
    source="Zhai et al. (2023), Figure 6 (SigLiT setup, batch 16k, 900M examples seen): ImageNet zero-shot accuracy "
           "(axis 60-80%), the learned bias (axis -15 to 0) and the mean positive and negative logits, against the "
           "positive:negative ratio kept (1:16k unmasked, then 1:1.6k, 1:164, 1:16, 1:1.6). The paper prints no "
           "numbers for it; the rows below are its text.",
    columns=["negatives kept", "what the paper reports"],
    rows=[["random", "deteriorates performance as more are removed"], ["easiest", "does not work at all"],
          ["hardest", "almost maintains the quality of all negatives"],
          ["hardest, matched pairs", "slightly better than hardest at equal steps"],
          ["(all settings)", "fewer negatives: learned bias and mean logits more positive"]],
)


def study(smoke: bool) -> Study:
    """Batch 128, 400 steps, a tenth of the negatives kept (1:12.7), 4 seeds; smoke: batch 16, 4 steps, 2 seeds."""
    batch, steps, fraction = (16, 4, 0.25) if smoke else (128, 400, 0.1)
    tower = TowerSpec(steps=6, batch_size=16, pool_size=64) if smoke else TowerSpec()
    longer = matched_steps(steps, batch, fraction)
    ratio = f"1:{fraction * (batch - 1):.3g}"
    arms = [Arm("all negatives", batch, steps, image_tower=LOCKED)]
    arms += [Arm(f"{choice}, {ratio}", batch, steps, image_tower=LOCKED, objective=MaskedNegatives(fraction, choice))
             for choice in CHOICES]
    arms.append(Arm(f"hard, {ratio}, matched pairs", batch, longer, image_tower=LOCKED,
                    objective=MaskedNegatives(fraction, "hard")))
    # The other masked arms start b at their own prior, so their bias is higher by construction; this one starts
    # where "all negatives" does, so that only training can move it apart.
    arms.append(Arm(f"random, {ratio}, b from all", batch, steps, image_tower=LOCKED,
                    objective=MaskedNegatives(fraction, "random"), init_logit_bias=prior_logit_bias(batch)))
    every, random, easy, hard, matched, random_same_start = (arm.name for arm in arms)
    comparisons = [
        Comparison(f"removing negatives at random ({ratio}) hurts", plus=(every,), minus=(random,)),
        Comparison("keeping the easiest negatives is worse than random ones", plus=(random,), minus=(easy,),
                   must_learn=(random,)),
        Comparison("keeping the hardest negatives beats random ones", plus=(hard,), minus=(random,)),
        Comparison("keeping the hardest negatives almost keeps the quality of all (within 2 points)", plus=(hard,),
                   minus=(every,), margin=0.02),
        Comparison("the hardest with matched pairs beats the hardest at equal steps", plus=(matched,),
                   minus=(hard,)),
        Comparison("the learned bias ends higher with fewer (random) negatives, both from the same start",
                   plus=(random_same_start,), minus=(every,), metric="logit_bias", percent=False, must_learn=()),
    ]
    scope = (
        f"Tested, in the paper's setting: a locked, pretrained image tower, one masking ratio ({ratio}, near the "
        f"paper's 1:16) at batch {batch}, {steps} steps ({longer} for matched pairs), with the bias starting at the "
        "prior of the kept ratio; the bias claim by a random arm that starts at the prior of all negatives, as the "
        "arm it is compared with does. Not tested: the other ratios of the paper's sweep (each costs a run per "
        "strategy and seed), and its batch of 16k, where 'hard' negatives are rarely near-duplicates; in a world of 38 "
        "colour-shape pairs the hardest negatives of a batch are often captions of the same objects in other "
        "words, which a masking choice cannot tell from a true negative."
    )
    return Study(name="negatives", title="Masking negatives: random, easiest, hardest (SigLiT setup)", claim=CLAIM,
                 paper=[PAPER], arms=arms, comparisons=comparisons, scope=scope,
                 seeds=(0, 1) if smoke else (0, 1, 2, 3),
                 scale=Scale(corpus_size=256, pool_size=64, test_size=64) if smoke else Scale(), tower=tower,
                 setup=[f"Sigmoid loss against a locked pretrained image tower (features cached), batch {batch}; "
                        f"negatives kept {ratio} ({fraction:g} of them), chosen anew on every batch over its whole "
                        "logit matrix; bias starting at -log(kept negatives per positive), except in the arm "
                        "marked 'b from all', which starts at the prior of all negatives"],
                 smoke=smoke, tables=logit_table)


def logit_table(study: Study, results: Results) -> list[Table]:
    """The learned bias and the mean held-out logits of positive and negative pairs (the paper's Figure 6 panels)."""
    rows = []
    for arm in study.arms:
        trials = results[arm.name]
        rows.append([arm.name, str(arm.steps), f"{arm.logit_bias_at_start():.2f}",
                     format_mean([t.metrics["logit_bias"] for t in trials], digits=2),
                     format_mean([t.metrics.get("logit/positive", float("nan")) for t in trials], digits=2),
                     format_mean([t.metrics.get("logit/negative", float("nan")) for t in trials], digits=2)])
    return [Table("Learned bias and mean logits", ["arm", "steps", "b at start", "b at end", "mean positive logit",
                                                   "mean negative logit"], rows,
                  note="Logits t <x, y> + b over the held-out images and captions, identical captions counting as "
                       "positives; mean ± standard deviation over seeds. No chance level applies to a logit.")]
