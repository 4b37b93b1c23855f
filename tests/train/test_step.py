"""siglip.train.step: micro-batches and cached image features give the full batch's gradient."""

from __future__ import annotations

import random

import pytest
import torch

from siglip.train.step import forward_backward
from train.runs import (
    tiny_towers,
)


@pytest.mark.parametrize("loss,lock_image", [("sigmoid", False), ("softmax", False), ("sigmoid", True)])
def test_micro_batch_gradient_equals_full_batch(loss, lock_image):
    model, towers = tiny_towers(lock_image)
    if loss == "softmax":
        model.logit_bias.requires_grad_(False)
    size = model.config.vision_config.image_size
    n = 11
    pixel_values = torch.randn(n, 3, size, size)
    input_ids = torch.randint(0, 64, (n, 8))
    positive_ids = torch.randint(0, 4, (n,))              # repeated ids: several positives per row

    def gradients(micro_batch):
        model.zero_grad(set_to_none=True)
        value = forward_backward(towers, pixel_values, input_ids, positive_ids, loss=loss, micro_batch=micro_batch)
        return value, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    want_loss, want = gradients(None)
    got_loss, got = gradients(4)                          # micro-batches of 4, 4, 3
    # The two paths embed in batches of 11 and of 4, so the matrix products round differently: over 360 draws the
    # losses differed by at most 1.0 float32 ulp (1.2e-7 relative, locked image tower; 0 otherwise). 16 ulps is the
    # bound, a 16x margin; a wrong gradient path moves the loss by far more.
    assert torch.allclose(got_loss, want_loss, rtol=16 * torch.finfo(torch.float32).eps, atol=0), (
        f"loss {got_loss.item()!r} in micro-batches against {want_loss.item()!r}")
    assert want.keys() == got.keys() and len(want) > 0
    assert ("logit_bias" in want) == (loss == "sigmoid")
    assert not any(name.startswith("vision_model") for name in want) if lock_image else True
    overall = max(grad.abs().max().item() for grad in want.values())
    for name in want:
        scale = want[name].abs().max().item()
        error = (got[name] - want[name]).abs().max().item()
        if name.endswith("k_proj.bias"):
            # Softmax attention is invariant to a bias added to every key: this gradient is zero up to rounding,
            # so only its size against the other gradients means anything.
            assert scale <= 1e-5 * overall and error <= 1e-5 * overall, name
            continue
        assert error <= 1e-5 * scale, f"{name}: error {error:.2e} against {scale:.2e}"


@pytest.mark.parametrize("micro_batch", [None, 4])
def test_cached_image_features_give_the_text_tower_the_same_gradient(micro_batch):
    from siglip.train.feature_cache import ImageFeatureCache
    from siglip.train.step import frozen_image_encoder

    torch.manual_seed(random.randrange(2**31))
    model, towers = tiny_towers(lock_image=True)
    model.vision_model.eval()
    size = model.config.vision_config.image_size
    n = 11
    images = torch.randn(8, 3, size, size)
    picks = [0, 1, 2, 3, 4, 5, 6, 7, 2, 5, 2]                 # an image may come twice in a batch (a refill)
    pixel_values, keys = images[picks], [f"image/{pick}" for pick in picks]
    input_ids = torch.randint(0, 64, (n, 8))
    positive_ids = torch.randint(0, 4, (n,))
    cache = ImageFeatureCache(capacity=8)
    encode = frozen_image_encoder(model, torch.device("cpu"), micro_batch, None)

    def gradients(image_features):
        model.zero_grad(set_to_none=True)
        value = forward_backward(towers, None if image_features is not None else pixel_values, input_ids,
                                 positive_ids, micro_batch=micro_batch, image_features=image_features)
        return value, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    want_loss, want = gradients(None)
    cached = cache.features(keys, pixel_values, encode)
    assert cache.encoded == 8 and cache.looked_up == 3 and cached.dtype == torch.float32
    got_loss, got = gradients(cached)
    # A second visit is served from the cache alone and gives the same features.
    assert torch.equal(cache.features(keys[::-1], pixel_values.flip(0), encode), cached.flip(0))
    assert cache.encoded == 8

    assert want.keys() == got.keys() and len(want) > 0
    assert not any(name.startswith("vision_model") for name in want)
    assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=0)
    overall = max(grad.abs().max().item() for grad in want.values())
    for name in want:
        scale = want[name].abs().max().item()
        error = (got[name] - want[name]).abs().max().item()
        if name.endswith("k_proj.bias"):                  # zero up to rounding (see the micro-batch test)
            assert scale <= 1e-5 * overall and error <= 1e-5 * overall, name
            continue
        assert error <= 1e-5 * scale, f"{name}: error {error:.2e} against {scale:.2e}"
