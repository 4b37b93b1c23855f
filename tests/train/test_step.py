"""siglip.train.step: micro-batches (dropout masks replayed) and cached image features give the full batch's gradient;
the frozen encoder gives an image one embedding; a diverged t or b makes the loss NaN instead of an error."""

from __future__ import annotations

import math
import random

import pytest
import torch

from reference import reference_softmax_loss, scalar_gradient_scales
from siglip.train.step import contrastive_loss, forward_backward, frozen_image_encoder
from train.runs import tiny_towers, with_attention_dropout

# Each comparison of two gradient paths below is held to the largest error measured over 300 fresh draws of the
# test's inputs (`.venv/bin/python tests/train/measure_step_errors.py 0 300`, 2-core CPU, every path of this file)
# times the margin stated beside it, as a fraction of the scale named:
LOSS_RTOL = 16 * torch.finfo(torch.float32).eps
"""Of the loss: measured 2.0e-7 (1.7 float32 ulps; the paths embed in batches of other sizes), a 9x margin."""
GRADIENT_RTOL = 7e-5
"""Of each parameter's largest gradient entry: measured 6.7e-6, a 10x margin."""
SCALE_RTOL = 5e-6
"""Of t' = log t's gradient against t * (1/n) sum_ij |g_ij s_ij|, the terms its gradient sums: they have either sign
and can cancel to far below any one of them, so an error relative to the result is no measure (the former bound of
1e-5 of the result failed about one draw in 60). Measured 5.0e-7, a 10x margin."""
BIAS_RTOL = 2e-6
"""Of b's gradient against (1/n) sum_ij |g_ij|, likewise: measured 1.6e-7, a 12x margin."""
KEY_BIAS_SHARE = 1e-5
"""Key-projection biases get a gradient that is zero up to rounding (softmax attention is invariant to a bias added
to every key): their gradient and its error, against the model's largest gradient entry; measured 2.6e-8, the
bound a size below which such a gradient is rounding noise."""


def _random_batch(model, n: int):
    size = model.config.vision_config.image_size
    # Repeated ids: several positives per row.
    return torch.randn(n, 3, size, size), torch.randint(0, 64, (n, 8)), torch.randint(0, 4, (n,))


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _scalar_scales(loss: str, x, y, t, b, positive_ids) -> tuple[float, float]:
    """The sizes of the sums behind d loss / d t and d loss / d b (see SCALE_RTOL), in float64."""
    if loss == "sigmoid":
        return scalar_gradient_scales(x, y, t, b, positive_ids)
    # CLIP's loss of logits t * s: with x = s and y = I the reference computes exactly that, and its gradient with
    # respect to s is t * d loss / d logits.
    s = (x.double() @ y.double().t()).requires_grad_(True)
    value = reference_softmax_loss(s, torch.eye(len(s), dtype=torch.float64), t, positive_ids)
    (grad,) = torch.autograd.grad(value, s)
    return (grad * s).abs().sum().item() / t.item(), 0.0


def gradient_errors(case: dict) -> dict[str, float]:
    """Each error of a case as a fraction of the scale its tolerance above names: "loss", "gradient" (the largest
    over the parameters), "t'", "b", "key_bias" (the larger of the gradient and its error, against the largest)."""
    got, want = case["got"], case["want"]
    assert want.keys() == got.keys() and len(want) > 0
    x, y, t, b = (value.detach() for value in case["features"])
    scale_terms, bias_terms = _scalar_scales(case["loss"], x, y, t, b, case["positive_ids"])
    overall = max(grad.abs().max().item() for grad in want.values())
    errors = {"loss": abs(case["got_loss"].item() - case["want_loss"].item()) / abs(case["want_loss"].item()),
              "gradient": 0.0, "key_bias": 0.0}
    for name in want:
        size, error = want[name].abs().max().item(), (got[name] - want[name]).abs().max().item()
        if name == "logit_scale":
            errors["t'"] = error / (t.item() * scale_terms)
        elif name == "logit_bias":
            errors["b"] = error / bias_terms
        elif name.endswith("k_proj.bias"):
            errors["key_bias"] = max(errors["key_bias"], max(size, error) / overall)
        else:
            errors["gradient"] = max(errors["gradient"], error / size)
    return errors


def _assert_same_gradients(case: dict) -> None:
    """Every gradient of a case within the tolerances above."""
    errors = gradient_errors(case)
    assert errors["gradient"] <= GRADIENT_RTOL, errors
    assert errors["t'"] <= SCALE_RTOL and errors.get("b", 0.0) <= BIAS_RTOL, errors
    assert errors["key_bias"] <= KEY_BIAS_SHARE, errors


def _features(towers, pixel_values, input_ids):
    with torch.no_grad():
        return towers(pixel_values, input_ids)


def micro_batch_case(loss: str, lock_image: bool) -> dict:
    """One fresh draw: the full batch's loss and gradients (want) against micro-batches of 4, 4, 3 (got)."""
    model, towers = tiny_towers(lock_image)
    if loss == "softmax":
        model.logit_bias.requires_grad_(False)
    pixel_values, input_ids, positive_ids = _random_batch(model, 11)

    def gradients(micro_batch):
        model.zero_grad(set_to_none=True)
        value = forward_backward(towers, pixel_values, input_ids, positive_ids, loss=loss, micro_batch=micro_batch)
        return value, _gradients(model)

    want_loss, want = gradients(None)
    got_loss, got = gradients(4)
    return {"got_loss": got_loss, "want_loss": want_loss, "got": got, "want": want, "loss": loss,
            "features": _features(towers, pixel_values, input_ids), "positive_ids": positive_ids}


def cached_case(micro_batch: int | None) -> dict:
    """One fresh draw: the locked image tower's own embeddings (want) against the cache's (got)."""
    from siglip.train.feature_cache import ImageFeatureCache

    model, towers = tiny_towers(lock_image=True)
    model.vision_model.eval()
    images = _random_batch(model, 8)[0]
    picks = [0, 1, 2, 3, 4, 5, 6, 7, 2, 5, 2]                 # an image may come twice in a batch (a refill)
    pixel_values, keys = images[picks], [f"image/{pick}" for pick in picks]
    _, input_ids, positive_ids = _random_batch(model, 11)
    cache = ImageFeatureCache(capacity=8)
    encode = frozen_image_encoder(model, torch.device("cpu"), micro_batch, None)

    def gradients(image_features):
        model.zero_grad(set_to_none=True)
        value = forward_backward(towers, None if image_features is not None else pixel_values, input_ids,
                                 positive_ids, micro_batch=micro_batch, image_features=image_features)
        return value, _gradients(model)

    want_loss, want = gradients(None)
    cached = cache.features(keys, pixel_values, encode)
    assert cache.encoded == 8 and cache.looked_up == 3 and cached.dtype == torch.float32
    got_loss, got = gradients(cached)
    # A second visit is served from the cache alone and gives the same features.
    assert torch.equal(cache.features(keys[::-1], pixel_values.flip(0), encode), cached.flip(0))
    assert cache.encoded == 8
    return {"got_loss": got_loss, "want_loss": want_loss, "got": got, "want": want, "loss": "sigmoid",
            "features": _features(towers, pixel_values, input_ids), "positive_ids": positive_ids}


def dropout_case(lock_image: bool) -> dict:
    """One fresh draw with attention dropout: micro-batches of 4, 4, 3 (got) against what they compute (want):
    each micro-batch through the towers in turn, drawing its dropout masks in that order from the same random
    state, then the loss of all of them, and its exact gradient by one backward pass."""
    model, towers = tiny_towers(lock_image)
    with_attention_dropout(model, 0.1)
    if lock_image:
        model.vision_model.eval()
    pixel_values, input_ids, positive_ids = _random_batch(model, 11)
    start = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    got_loss = forward_backward(towers, pixel_values, input_ids, positive_ids, micro_batch=4)
    got = _gradients(model)
    torch.set_rng_state(start)
    model.zero_grad(set_to_none=True)
    parts = [towers(pixel_values[part], input_ids[part]) for part in (slice(0, 4), slice(4, 8), slice(8, 11))]
    features = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parts[0][2], parts[0][3])
    want_loss = contrastive_loss("sigmoid", *features, None, positive_ids)
    want_loss.backward()
    want = _gradients(model)
    # Dropout is on: the same batch under other masks gives another loss.
    model.zero_grad(set_to_none=True)
    again = forward_backward(towers, pixel_values, input_ids, positive_ids, micro_batch=4)
    return {"got_loss": got_loss, "want_loss": want_loss.detach(), "got": got, "want": want, "loss": "sigmoid",
            "features": features, "positive_ids": positive_ids, "other_masks_loss": again}


@pytest.mark.parametrize("loss,lock_image", [("sigmoid", False), ("softmax", False), ("sigmoid", True)])
def test_micro_batch_gradient_equals_full_batch(loss, lock_image):
    case = micro_batch_case(loss, lock_image)
    assert torch.allclose(case["got_loss"], case["want_loss"], rtol=LOSS_RTOL, atol=0), (
        f"loss {case['got_loss'].item()!r} in micro-batches against {case['want_loss'].item()!r}")
    assert ("logit_bias" in case["want"]) == (loss == "sigmoid")
    assert any(name.startswith("vision_model") for name in case["want"]) == (not lock_image)
    _assert_same_gradients(case)


@pytest.mark.parametrize("micro_batch", [None, 4])
def test_cached_image_features_give_the_text_tower_the_same_gradient(micro_batch):
    case = cached_case(micro_batch)
    assert not any(name.startswith("vision_model") for name in case["want"])
    assert torch.allclose(case["got_loss"], case["want_loss"], rtol=LOSS_RTOL, atol=0)
    _assert_same_gradients(case)


@pytest.mark.parametrize("lock_image", [False, True])
def test_micro_batches_replay_the_dropout_masks(lock_image):
    case = dropout_case(lock_image)
    # The same masks, so the same embeddings and the same loss; the gradients differ only in the order the
    # micro-batches' shares are summed (measured: 1.8e-7 of a gradient, t and b exact). Masks drawn anew in the
    # second pass, the fault this guards against, move the embeddings by up to 0.12 and a gradient by its own size.
    assert torch.equal(case["got_loss"], case["want_loss"])
    _assert_same_gradients(case)
    assert not torch.equal(case["other_masks_loss"], case["got_loss"])


def test_the_frozen_encoder_gives_an_image_the_same_embedding_in_any_company():
    model, _ = tiny_towers(lock_image=True)
    model.vision_model.eval()
    chunk = random.choice([3, 4, 5])
    encode = frozen_image_encoder(model, torch.device("cpu"), chunk, None)
    images = _random_batch(model, 9)[0]
    alone = torch.cat([encode(images[index:index + 1]) for index in range(9)])       # each padded to `chunk`
    order = torch.randperm(9)
    # In groups of `chunk` with other images, in another order: bitwise the embedding each image has alone, which is
    # what makes a cache filled in a resumed run equal to one filled without interruption.
    assert torch.equal(encode(images[order]), alone[order])
    assert torch.equal(encode(images[order[:2]]), alone[order[:2]])


@pytest.mark.parametrize("micro_batch", [None, 4])
def test_a_non_finite_scale_or_bias_gives_a_nan_loss_instead_of_an_error(micro_batch):
    from siglip.loss import sigmoid_loss

    model, towers = tiny_towers()
    # A diverged run: t' so large that exp(t') overflows float32 (t = inf), or b itself not finite.
    parameter, value = random.choice([(model.logit_scale, 100.0), (model.logit_bias, math.nan),
                                      (model.logit_bias, -math.inf)])
    with torch.no_grad():
        parameter.fill_(value)
    pixel_values, input_ids, positive_ids = _random_batch(model, 11)
    loss = forward_backward(towers, pixel_values, input_ids, positive_ids, micro_batch=micro_batch)
    assert torch.isnan(loss)                                   # the guard then skips the update
    # The public loss still refuses such a t or b, by name.
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        sigmoid_loss(x, x, torch.tensor(math.inf), torch.tensor(-10.0))
