"""Patch tokens with patches masked: transformers' forward with the mask token put in by hand, literally."""

from __future__ import annotations

import random

import pytest
import torch

from siglip.siglip2.vision import image_tokens

from .towers import tiny_vision_model


def by_hand(model, pixel_values, patch_mask, mask_token):
    """The tower's forward written out: patch projection, the mask token in place of masked patches, position
    embeddings, encoder, final layer norm, attention-pooling head."""
    projected = model.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)       # (n, P, D)
    projected = torch.where(patch_mask.unsqueeze(-1), mask_token, projected)
    hidden = projected + model.embeddings.position_embedding(model.embeddings.position_ids)
    hidden = model.post_layernorm(model.encoder(inputs_embeds=hidden).last_hidden_state)
    return hidden, model.head(hidden)


def test_unmasked_tokens_are_transformers_own_output():
    model = tiny_vision_model()
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    output = model(pixel_values=pixels)
    patches, pooled = image_tokens(model, pixels)
    assert patches.shape == (3, 16, 32) and pooled.shape == (3, 32)
    assert torch.equal(patches, output.last_hidden_state) and torch.equal(pooled, output.pooler_output)


def test_masked_patches_are_replaced_before_the_positions_are_added():
    model = tiny_vision_model()
    n = random.randint(1, 4)
    pixels = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    mask = torch.rand(n, 16) < 0.5
    token = torch.randn(32, dtype=torch.float64, requires_grad=True)
    patches, pooled = image_tokens(model, pixels, patch_mask=mask, mask_token=token)
    want_patches, want_pooled = by_hand(model, pixels, mask, token)
    # float64; the hook and the hand-written path run the same operations: rounding differences only
    torch.testing.assert_close(patches, want_patches, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-12, atol=1e-12)
    pooled.sum().backward()
    assert token.grad is not None and (token.grad != 0).any() == mask.any()
    # the hook is gone afterwards, and an all-False mask changes nothing
    assert torch.equal(image_tokens(model, pixels)[0], model(pixel_values=pixels).last_hidden_state)
    unmasked = image_tokens(model, pixels, patch_mask=torch.zeros(n, 16, dtype=torch.bool), mask_token=token)[0]
    assert torch.equal(unmasked, model(pixel_values=pixels).last_hidden_state)


def test_local_crops_of_another_size_read_resized_positions_and_bad_masks_are_named():
    model = tiny_vision_model()
    crops = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    patches, pooled = image_tokens(model, crops, interpolate_pos_encoding=True)
    assert patches.shape == (2, 4, 32) and pooled.shape == (2, 32)
    token = torch.zeros(32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"patch_mask must be \(2, 16\)"):
        image_tokens(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), patch_mask=torch.ones(2, 4).bool(),
                     mask_token=token)
    with pytest.raises(ValueError, match="give both or neither"):
        image_tokens(model, crops, patch_mask=torch.ones(2, 4).bool())


def test_the_mask_token_enters_in_the_autocast_dtype():
    model = tiny_vision_model(dtype=torch.float32)
    pixels = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16) < 0.5
    token = torch.randn(32, requires_grad=True)
    want = image_tokens(model, pixels, patch_mask=mask, mask_token=token)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = image_tokens(model, pixels, patch_mask=mask, mask_token=token)[0]
    # (the final layer norm runs in float32 under autocast; the patch projection the hook edits, in bfloat16)
    # bfloat16 keeps 8 bits of mantissa: through two layers, outputs of order 1 stay within about 0.1
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.1)
    got.float().sum().backward()
    assert token.grad is not None and token.grad.dtype == torch.float32
