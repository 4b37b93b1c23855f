"""The recipe's added losses for a slice against their literal per-image formulas, with the paper's weights; views
drawn for the global batch give every rank and micro-batch the same rows; the teacher's targets and centres."""

from __future__ import annotations

import random

import torch

from siglip.siglip2.decoder import DecoderConfig, LocCaDecoder
from siglip.siglip2.distill import (
    DistillationHeads,
    EmaTeacher,
    distillation_loss,
    head_sizes,
    heads_for,
    masked_prediction_loss,
    teacher_distribution,
    teacher_logits,
    updated_center,
)
from siglip.siglip2.recipe import (
    CONSISTENCY,
    DECODER,
    LOCAL_VIEWS,
    MASK_RATIO,
    MASKED,
    RecipeWeights,
    Siglip2Parts,
    crops_of,
    draw_views,
    local_crop_side,
    student_losses,
    teacher_targets,
)
from siglip.siglip2.vision import image_tokens

from .towers import tiny_vision_model


def tiny_parts(vocab_size: int = 40) -> Siglip2Parts:
    decoder = LocCaDecoder(DecoderConfig(vocab_size, 32, width=16, layers=1, heads=2, mlp=32, max_length=10)).double()
    heads = DistillationHeads(32, hidden=16, bottleneck=8, prototypes=12, patch_prototypes=6).double()
    return Siglip2Parts(decoder, heads)


def random_distributions(*shape: int) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(*shape, dtype=torch.float64), dim=-1)


def test_the_added_losses_are_the_weighted_sums_of_their_per_image_formulas():
    n, views, vocab_size = random.randint(2, 4), 3, 40
    tower, parts = tiny_vision_model(), tiny_parts(vocab_size)
    weights = RecipeWeights(decoder=random.uniform(0.5, 2), distillation=random.uniform(0.1, 1))
    pixels = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    tokens = torch.randint(1, vocab_size, (n, 3, 10))
    scored = torch.rand(n, 3, 10) < 0.7
    scored[0, 2] = False                                           # a target without a scored token: not counted
    boxes, mask = draw_views(random.randrange(1000), random.randrange(1000), n, 32, 8, slice(0, n), views=views)
    inputs = {"decoder_tokens": tokens, "decoder_scored": scored, "crops": crops_of(pixels, boxes, 16),
              "global_targets": random_distributions(n, 12), "patch_mask": mask,
              "patch_targets": random_distributions(n, 16, 6)}
    patches, _ = image_tokens(tower, pixels)
    got = student_losses(parts, tower, pixels, patches, inputs, weights)
    assert set(got) == {DECODER, CONSISTENCY, MASKED}

    decoder_sum = consistency_sum = masked_sum = 0.0
    for i in range(n):
        counted = [k for k in range(3) if (scored[i, k, 1:] & (tokens[i, k, 1:] != 0)).any()]
        decoder_sum += torch.stack([parts.decoder.loss(patches[i:i + 1], tokens[i, k:k + 1], scored[i, k:k + 1])
                                    for k in counted]).mean()
        pooled = torch.stack([image_tokens(tower, inputs["crops"][i, v:v + 1], interpolate_pos_encoding=True)[1][0]
                              for v in range(views)])                                  # crop by crop
        consistency_sum += distillation_loss(parts.heads.global_head(pooled)[None], inputs["global_targets"][i:i + 1])
        masked_tokens, _ = image_tokens(tower, pixels[i:i + 1], patch_mask=mask[i:i + 1],
                                        mask_token=parts.heads.mask_token)
        masked_sum += masked_prediction_loss(parts.heads.patch_head(masked_tokens), inputs["patch_targets"][i:i + 1],
                                             mask[i:i + 1])
    # float64, batches of other sizes: rounding only
    torch.testing.assert_close(got[DECODER], weights.decoder * decoder_sum, rtol=1e-10, atol=0)
    torch.testing.assert_close(got[CONSISTENCY], weights.distillation * 1.0 * consistency_sum, rtol=1e-10, atol=0)
    torch.testing.assert_close(got[MASKED], weights.distillation * 0.25 * masked_sum, rtol=1e-10, atol=0)
    # Before the switch-on step only the decoder's inputs are given, and only its term comes out.
    only = {name: inputs[name] for name in ("decoder_tokens", "decoder_scored")}
    assert set(student_losses(parts, tower, pixels, patches, only, weights)) == {DECODER}


def test_every_rank_and_micro_batch_reads_its_rows_of_the_global_draw():
    seed, step, batch = random.randrange(10**6), random.randrange(10**6), 12
    boxes, masks = draw_views(seed, step, batch, 32, 8, slice(0, batch))
    assert boxes.shape == (batch, LOCAL_VIEWS, 4) and masks.shape == (batch, 16)
    assert (masks.sum(dim=1) == round(MASK_RATIO * 16)).all()
    for ranks in (2, 3, 4):
        local = batch // ranks
        for rank in range(ranks):
            rows = slice(rank * local, (rank + 1) * local)
            got_boxes, got_masks = draw_views(seed, step, batch, 32, 8, rows)
            assert torch.equal(got_boxes, boxes[rows]) and torch.equal(got_masks, masks[rows])
    other_boxes, _ = draw_views(seed, step + 1, batch, 32, 8, slice(0, batch))
    assert not torch.equal(other_boxes, boxes)                     # each step draws anew
    assert local_crop_side(32, 8) == 16 and local_crop_side(224, 16) == 112 and local_crop_side(8, 8) == 8


def test_the_teachers_targets_are_centred_and_sharpened_and_the_centres_move_once():
    tower = tiny_vision_model()
    heads = DistillationHeads(32, hidden=16, bottleneck=8, prototypes=12, patch_prototypes=6).double()
    teacher = EmaTeacher(torch.nn.ModuleDict({"vision": tower, "heads": heads}))
    pixels = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    centers = {"global": torch.randn(12), "patch": torch.randn(6)}
    global_targets, patch_targets, moved = teacher_targets(teacher, pixels, centers, chunk=2)
    global_logits, patch_logits = teacher_logits(tower, heads, pixels)
    torch.testing.assert_close(global_targets, teacher_distribution(global_logits, centers["global"]),
                               rtol=1e-6, atol=1e-6)          # float32 logits, chunks of 2 against one of 5
    torch.testing.assert_close(patch_targets, teacher_distribution(patch_logits, centers["patch"]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(moved["global"], updated_center(centers["global"], global_logits), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(moved["patch"], updated_center(centers["patch"], patch_logits), rtol=1e-6, atol=1e-7)
    assert not global_targets.requires_grad and global_targets.shape == (5, 12) and patch_targets.shape == (5, 16, 6)


def test_heads_take_dinos_sizes_as_caps_and_scale_down_below_them():
    assert head_sizes(768) == {"hidden": 2048, "bottleneck": 256, "prototypes": 49152, "patch_prototypes": 6144}
    assert head_sizes(1152) == {"hidden": 2048, "bottleneck": 256, "prototypes": 65536, "patch_prototypes": 8192}
    tiny = heads_for(128)
    assert tiny.global_head.prototypes.shape == (8192, 64) and tiny.patch_head.prototypes.shape == (1024, 64)
    assert tiny.global_head.mlp[0].out_features == 512 and tiny.mask_token.shape == (128,)
