"""The recipe's parts fit together: one step of the decoder, self-distillation and masked prediction on shapes
samples with regions, a tiny tower and a trained tokenizer; its gradient reaches every part, and micro-batches
(teacher targets computed once, views drawn once for the batch) give the whole batch's gradient.

Not a module's test: the package's parts, as siglip.train will call them (phase B of the SigLIP 2 issue).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from siglip.data.shapes import ShapesSource
from siglip.siglip2.boxes import DecoderVocabulary, pad_targets, sample_target
from siglip.siglip2.decoder import DecoderConfig, LocCaDecoder
from siglip.siglip2.distill import (
    DistillationHeads,
    EmaTeacher,
    distillation_loss,
    masked_prediction_loss,
    teacher_distribution,
    teacher_logits,
)
from siglip.siglip2.views import crop_views, local_crop_boxes, patch_masks
from siglip.siglip2.vision import image_tokens
from siglip.tokenizer import train_tokenizer

from .towers import tiny_vision_model


def recipe_batch(seed: int, n: int):
    source = ShapesSource(seed=seed, image_size=32, with_regions=True)
    samples = [source.train_sample(index) for index in range(n)]
    tokenizer = train_tokenizer(source.caption_corpus(200), vocab_size=160, max_length=32)
    vocab = DecoderVocabulary(text_size=len(tokenizer))
    rng = random.Random(seed)
    targets = [sample_target(vocab, sample.caption, sample.regions, sample.image.size,
                             lambda text: tokenizer(text)["input_ids"], rng) for sample in samples]
    tokens, scored = pad_targets(targets, 40, vocab.pad_id)
    # [0, 255] -> [-1, 1], SigLIP's normalisation
    pixels = torch.stack([torch.from_numpy(np.asarray(sample.image).copy()).permute(2, 0, 1) for sample in samples])
    return vocab, tokens, scored, pixels.double() / 127.5 - 1.0


def student_loss(tower, decoder, heads, pixels, tokens, scored, crops, mask, global_targets, patch_targets, n):
    """The three added losses of this slice of the batch, each summed over its images and divided by the batch's n,
    weighted as the paper does (decoder 1, consistency 1, masked prediction 0.25)."""
    patches, _ = image_tokens(tower, pixels)
    decoder_loss = decoder.loss(patches, tokens, scored, reduction="sum")
    views = crops.shape[1]
    _, crop_pooled = image_tokens(tower, crops.flatten(0, 1), interpolate_pos_encoding=True)
    local = distillation_loss(heads.global_head(crop_pooled).reshape(len(pixels), views, -1), global_targets,
                              reduction="sum")
    masked_patches, _ = image_tokens(tower, pixels, patch_mask=mask, mask_token=heads.mask_token)
    masked = masked_prediction_loss(heads.patch_head(masked_patches), patch_targets, mask, reduction="sum")
    return (decoder_loss + local + 0.25 * masked) / n


def test_one_step_reaches_every_part_and_micro_batches_give_the_same_gradient():
    seed, n = random.randrange(10**6), 6
    vocab, tokens, scored, pixels = recipe_batch(seed, n)
    tower = tiny_vision_model().train()
    decoder = LocCaDecoder(DecoderConfig(vocab.size, 32, width=32, layers=1, heads=2, mlp=64, max_length=40)).double()
    heads = DistillationHeads(32, hidden=16, bottleneck=8, prototypes=16, patch_prototypes=8).double()
    student = nn.ModuleDict({"vision": tower, "heads": heads})
    teacher = EmaTeacher(student)
    # once per batch: the teacher's targets (no graph), the crops and the masks
    global_logits, patch_logits = teacher_logits(teacher.module["vision"], teacher.module["heads"], pixels, chunk=4)
    global_targets = teacher_distribution(global_logits, torch.zeros(16, dtype=torch.float64))
    patch_targets = teacher_distribution(patch_logits, torch.zeros(8, dtype=torch.float64))
    generator = torch.Generator().manual_seed(seed)
    crops = crop_views(pixels, local_crop_boxes(n, 2, (32, 32), generator), 16)
    mask = patch_masks(n, 16, 0.5, generator)
    parts = [tower, decoder, heads]
    parameters = [parameter for part in parts for parameter in part.parameters()]

    def gradients(slices):
        for parameter in parameters:
            parameter.grad = None
        for part in slices:
            student_loss(tower, decoder, heads, pixels[part], tokens[part], scored[part], crops[part], mask[part],
                         global_targets[part], patch_targets[part], n).backward()
        return [parameter.grad.clone() for parameter in parameters]

    whole = gradients([slice(0, n)])
    for module in (tower.embeddings.patch_embedding, decoder.output, heads.global_head, heads.patch_head):
        assert all(parameter.grad.abs().sum() > 0 for parameter in module.parameters())
    assert heads.mask_token.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in teacher.parameters())
    # float64: micro-batches of 4 and 2 round differently from one of 6; 1e-10 is far above that, far below a bug
    for got, want in zip(gradients([slice(0, 4), slice(4, n)]), whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    before = [parameter.clone() for parameter in teacher.parameters()]
    with torch.no_grad():
        for parameter in parameters:
            parameter.sub_(0.1 * parameter.grad)
    teacher.update(student, 0.9)
    assert any(not torch.equal(a, b) for a, b in zip(teacher.parameters(), before, strict=True))
