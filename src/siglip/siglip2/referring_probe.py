"""Referring expressions from a frozen tower, the paper's protocol: a new decoder trained on the tower's patch tokens.

SigLIP 2's Table 5 (Tschannen et al., 2025, sec. 3.4.1, after LocCa) attaches a transformer decoder to the frozen,
un-pooled image features and trains it from scratch on referring expressions alone; the tower is then graded by the
decoder's accuracy at IoU > 0.5. A tower trained without a decoder (plain SigLIP) is graded the same way, so this
probe compares towers, where the decoder trained beside a tower (siglip.siglip2.dense_eval) grades the pair.

Here the decoder has the recipe's shapes (`paper_decoder_config`), the expressions are every object of `images`
training images of the shapes world, and training is AdamW with warm-up and cosine decay (siglip.optim), its batches
drawn from a seeded generator: the probe of one tower is a function of the seed.
"""

from __future__ import annotations

from typing import Any

import torch

from siglip.siglip2.boxes import (
    TextEncoder,
    location_bins,
    longest_target,
    normalise_box,
    pad_targets,
    refer_target,
    tokenizer_vocabulary,
)
from siglip.siglip2.decoder import LocCaDecoder, paper_decoder_config
from siglip.siglip2.decoder_files import SavedDecoder
from siglip.siglip2.dense_eval import patch_features


def train_referring_probe(model: torch.nn.Module, processor: Any, samples: list, *, text_length: int, steps: int = 300,
                          batch_size: int = 64, lr: float = 1e-3, seed: int = 0, device: str = "cpu",
                          bins: int | None = None) -> SavedDecoder:
    """A fresh decoder trained on `model`'s frozen patch tokens to box every object of `samples` (Samples with
    regions) from its phrase; returns it with its vocabulary and text length, ready for dense_eval.

    bins: location tokens per coordinate; None takes `location_bins(model)`, one per pixel of the tower's input.
    """
    from siglip.optim import build_optimizer

    vocab = tokenizer_vocabulary(processor.tokenizer, bins or location_bins(model))
    encode = TextEncoder(processor.tokenizer, text_length)
    features = patch_features(model, processor, [sample.image for sample in samples], device=device)   # (N, P, D)
    rows, targets = [], []
    for row, sample in enumerate(samples):
        for region in sample.regions or ():
            rows.append(row)
            targets.append(refer_target(vocab, encode(region.phrase), normalise_box(region.box, *sample.image.size)))
    if not targets:
        raise ValueError("the referring probe needs samples with regions (shapes opened with with_regions=True)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = LocCaDecoder(paper_decoder_config(vocab, model.config.text_config, features.shape[-1],
                                                    longest_target(text_length))).to(device).train()
    optimizer, schedule = build_optimizer(decoder, lr=lr, weight_decay=1e-4, warmup_steps=max(1, steps // 10),
                                          total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picks = torch.randint(len(targets), (batch_size,), generator=generator).tolist()
        chosen = [targets[pick] for pick in picks]
        tokens, scored = pad_targets(chosen, max(len(target.tokens) for target in chosen), vocab.pad_id)
        patches = features[[rows[pick] for pick in picks]].to(device)
        loss = decoder.loss(patches, tokens.to(device), scored.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return SavedDecoder(decoder.eval(), vocab, text_length)
