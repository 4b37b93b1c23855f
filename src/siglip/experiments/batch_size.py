"""Study: sigmoid vs softmax at a small and a large batch, both towers trained from scratch (the paper's SigLIP
batch-size study: Figure 2, middle, and Table 5). The design is `sigmoid_softmax.by_batch_study`'s."""

from __future__ import annotations

from siglip.experiments.design import PaperFigure, Scale, Study
from siglip.experiments.sigmoid_softmax import by_batch_study, paper_curve

CLAIM = (
    "Zhai et al. (2023), Section 4.2 and Figure 2 (middle): training both towers from scratch (SigLIP) at equal "
    "examples seen, the sigmoid loss beats the softmax loss at small batch sizes (below 32k), the gap closes as the "
    "batch grows, and both saturate (the sigmoid at 32k, the softmax at 98k)."
)

# Table 5 of the paper (appendix B): SigLIP B/16, ImageNet zero-shot accuracy (%), 3B and 9B examples seen.
TABLE_5 = [
    ("512", "51.5", "47.7", "-", "-"), ("1k", "57.3", "53.2", "-", "-"), ("2k", "62.1", "59.3", "-", "-"),
    ("4k", "65.3", "63.8", "68.4", "66.6"), ("8k", "68.6", "66.6", "70.6", "69.4"), ("16k", "-", "-", "72.3", "71.7"),
    ("32k", "69.9", "69.9", "73.4", "72.9"), ("98k", "69.5", "69.7", "73.0", "73.2"),
    ("307k", "-", "-", "71.6", "72.6"),
]
PAPER = PaperFigure(
    source="Zhai et al. (2023), Table 5 (appendix B; the numbers behind Figure 2, middle): SigLIP with a B/16 image "
           "tower and a B text tower trained from scratch on WebLI, ImageNet zero-shot accuracy (%); chance is 0.1%.",
    columns=["batch", "sigmoid, 3B seen", "softmax, 3B seen", "sigmoid, 9B seen", "softmax, 9B seen"],
    rows=[list(row) for row in TABLE_5],
    note="At 3B examples the sigmoid leads by 3.8 points at batch 512, 1.5-2.0 points at 4k-8k and 0 at 32k.",
    plot=paper_curve("paper_table5.png", "paper (Table 5): SigLIP B/16, 3B examples seen",
                     [512, 1024, 2048, 4096, 8192, 32768, 98304], [51.5, 57.3, 62.1, 65.3, 68.6, 69.9, 69.5],
                     [47.7, 53.2, 59.3, 63.8, 66.6, 69.9, 69.7]),
)

SCOPE = (
    "Tested: the sigmoid-softmax difference at batch 32 and at batch 256, and whether it shrinks from one to the "
    "other, with both losses starting from t = 10, the sigmoid's bias at its batch's prior, and 76,800 examples per "
    "arm, so that batch 256 still takes 300 steps and learns (an earlier design gave batch 1024 64 steps, which "
    "tested step count). Batch 16 was tried first: at 76,800 examples both of its first sigmoid runs stayed within "
    "10 points of chance (30.0% and 34.8% against 25%), too close to test a claim on. Not tested at this scale: the "
    "paper's batches (512 to 307k) and the saturation at 32k and "
    "decline beyond it, which concern batches 100x larger than a 2-core CPU trains in an hour; 'small' and 'large' "
    "here are relative to a world of 38 colour-shape pairs, not to WebLI."
)


def study(smoke: bool) -> Study:
    """Batches 32 and 256 at 76,800 examples, 4 seeds; smoke: batches 8 and 16, 2 seeds, a few steps."""
    if smoke:
        return by_batch_study(name="batch-size", title="Sigmoid vs softmax by batch size (SigLIP, from scratch)",
                              claim=CLAIM, paper=[PAPER], scope=SCOPE, batches=(8, 16), examples=64, seeds=(0, 1),
                              scale=Scale(corpus_size=256, pool_size=64, test_size=64), smoke=True)
    return by_batch_study(name="batch-size", title="Sigmoid vs softmax by batch size (SigLIP, from scratch)",
                          claim=CLAIM, paper=[PAPER], scope=SCOPE, batches=(32, 256), examples=76_800,
                          seeds=(0, 1, 2, 3), scale=Scale(), smoke=False)
