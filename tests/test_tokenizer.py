"""The tokenizer and processor: deterministic training, full-length left padding ending in </s>, round trips."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from PIL import Image

from siglip.errors import UserError
from siglip.model import EOS_TOKEN_ID, PAD_TOKEN_ID
from siglip.tokenizer import (
    build_processor,
    image_transform,
    load_processor,
    load_tokenizer,
    set_patch_budget,
    text_transform,
    tokenize,
    train_tokenizer,
)

COLORS = ["red", "green", "blue", "yellow", "purple", "white"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]


def random_captions(count: int, rng: random.Random) -> list[str]:
    words = lambda: f"{rng.choice(['a', 'one', 'the'])} {rng.choice(['small', 'large'])} {rng.choice(COLORS)} " \
                    f"{rng.choice(SHAPES)}"  # noqa: E731
    return [words() if rng.random() < 0.6 else f"{words()} and {words()}" for _ in range(count)]


@pytest.fixture(scope="module")
def captions():
    return random_captions(2000, random.Random(random.randrange(2**32)))


@pytest.fixture(scope="module")
def tokenizer(captions):
    return train_tokenizer(captions, vocab_size=200, max_length=16, seed=0)


def test_training_is_deterministic(captions, tokenizer):
    again = train_tokenizer(list(captions), vocab_size=200, max_length=16, seed=0)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer) <= 200
    # Frequent words become single tokens: the corpus's own words are learnt, not spelled out.
    assert tokenizer.tokenize("red circle") == ["▁red", "▁circle"]


def test_captions_are_left_padded_to_full_length_and_end_in_the_end_token(tokenizer, captions):
    processor = build_processor(tokenizer, image_size=32)
    to_ids = text_transform(processor)
    long_caption = " and ".join(captions[:10])                         # far more than 16 tokens: truncated
    for caption in [*captions[:20], "Red", "o", long_caption]:
        ids = to_ids(caption)
        assert ids.dtype == torch.int64 and ids.shape == (16,)
        assert ids[-1] == EOS_TOKEN_ID                                 # the pooled position holds </s>
        is_pad = ids == PAD_TOKEN_ID
        real = int((~is_pad).sum())
        assert is_pad[:16 - real].all() and not is_pad[16 - real:].any()   # pads only on the left
        if caption is not long_caption:
            assert tokenizer.decode(ids, skip_special_tokens=True).strip() == caption.lower()
    truncated = tokenizer.decode(to_ids(long_caption), skip_special_tokens=True).strip()
    assert long_caption.lower().startswith(truncated) and len(truncated) < len(long_caption)
    # The batch helper used in evaluation gives the same ids as the per-caption transform of the loader.
    batch = tokenize(processor, captions[:5])
    assert torch.equal(batch, torch.stack([to_ids(caption) for caption in captions[:5]]))


def test_unseen_characters_become_unk_and_small_vocabularies_work():
    tokenizer = train_tokenizer(["ab ab ba", "abba"] * 10, vocab_size=16, max_length=8)
    assert len(tokenizer) <= 16
    ids = tokenizer("ab zq")["input_ids"]
    assert tokenizer.unk_token_id in ids and ids[-1] == EOS_TOKEN_ID


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="no non-empty captions"):
        train_tokenizer(["", "  "], vocab_size=100, max_length=16)
    with pytest.raises(UserError, match="vocab_size must be at least 16, got 5"):
        train_tokenizer(["a b"], vocab_size=5, max_length=16)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer("/nonexistent/tokenizer")


def test_processor_round_trip_tokenises_and_resizes_alike(tmp_path, tokenizer, captions):
    processor = build_processor(tokenizer, image_size=24)
    processor.save_pretrained(tmp_path / "final")
    loaded = load_processor(str(tmp_path))                              # a train DIR resolves to DIR/final
    image = Image.fromarray(torch.randint(0, 256, (37, 29, 3), dtype=torch.uint8).numpy())
    assert torch.equal(image_transform(loaded)(image), image_transform(processor)(image))
    for caption in captions[:20]:
        assert torch.equal(text_transform(loaded)(caption), text_transform(processor)(caption))
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.model_max_length == 16
    # What the zero-shot pipeline asks the saved tokenizer for: 64 tokens, with an attention mask.
    piped = loaded.tokenizer(captions[:3], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    assert set(piped) == {"input_ids", "attention_mask"}
    assert torch.equal(piped["input_ids"][:, -16:], tokenize(processor, captions[:3]))
    assert torch.equal(piped["attention_mask"].bool(), piped["input_ids"] != PAD_TOKEN_ID)
    # A tokenizer directory can be reused instead of training a new one.
    reused = load_tokenizer(str(tmp_path), max_length=16)
    assert reused.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_image_transform_resizes_and_maps_pixels_to_minus_one_one(tokenizer):
    processor = build_processor(tokenizer, image_size=16)
    colour = torch.randint(0, 256, (3,))
    image = Image.new("RGB", (int(torch.randint(5, 60, ())), int(torch.randint(5, 60, ()))), tuple(colour.tolist()))
    pixels = image_transform(processor)(image)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    want = (colour.float() / 255 - 0.5) / 0.5                            # SigLIP's normalisation
    assert torch.allclose(pixels, want[:, None, None].expand(3, 16, 16), atol=1e-5)


def test_image_transform_gives_the_image_processors_pixels_bit_for_bit(tokenizer):
    side = int(torch.randint(8, 48, ()))
    processor = build_processor(tokenizer, image_size=side)
    transform = image_transform(processor)
    assert transform.size == (side, side)                               # RGB images of this size skip the processor
    images = [Image.fromarray(torch.randint(0, 256, (side, side, 3), dtype=torch.uint8).numpy()) for _ in range(8)]
    # Other sizes and modes go through the processor itself.
    images += [Image.fromarray(torch.randint(0, 256, (side + 3, side, 3), dtype=torch.uint8).numpy()),
               Image.fromarray(torch.randint(0, 256, (side, side), dtype=torch.uint8).numpy(), mode="L"),
               Image.fromarray(torch.randint(0, 256, (side, side, 4), dtype=torch.uint8).numpy(), mode="RGBA")]
    for image in images:
        want = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        got = transform(image)
        assert got.dtype == want.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, want)


def test_image_transform_runs_a_processor_it_does_not_mirror_in_full(tokenizer):
    processor = build_processor(tokenizer, image_size=16)
    processor.image_processor.do_normalize = False                     # pixels in [0, 1]: not (x * s - m) / d
    transform = image_transform(processor)
    assert transform.size is None
    image = Image.fromarray(torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy())
    want = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(transform(image), want) and want.min() >= 0


def test_text_transform_gives_the_tokenizers_ids(tokenizer, captions):
    processor = build_processor(tokenizer, image_size=16)
    transform = text_transform(processor)
    assert transform.encoder is not None                                # ours is encoded without the wrapper
    rng = random.Random(random.randrange(2**32))
    texts = rng.sample(captions, 200) + ["", " ", "Two LARGE Red Stars!", "snow \u2603 and \u00e6\u00f8\u00e5",
                                         " and ".join(rng.sample(captions, 12))]         # the last one is truncated
    texts += ["".join(rng.choice("abcdefgh ,.xyz") for _ in range(rng.randrange(0, 120))) for _ in range(100)]
    for text in texts:
        want = processor.tokenizer(text, padding="max_length", max_length=transform.length, truncation=True)
        assert transform(text).tolist() == want["input_ids"], text


def test_transforms_pickle_for_dataloader_workers(tokenizer, captions):
    processor = build_processor(tokenizer, image_size=16)
    image = Image.new("RGB", (20, 20), (10, 200, 30))
    for transform, value in ((text_transform(processor), captions[0]), (image_transform(processor), image)):
        copy = pickle.loads(pickle.dumps(transform))
        assert torch.equal(copy(value), transform(value))


# ------------------------------------------------------------------------------------------------------- NaFlex


@pytest.fixture(scope="module")
def naflex_processor(tokenizer):
    return build_processor(tokenizer, image_size=32, preset="naflex-tiny", max_num_patches=int(random.randint(6, 24)))


def test_naflex_processor_keeps_the_presets_patch_and_the_budget(tokenizer):
    processor = build_processor(tokenizer, image_size=48, preset="naflex-tiny")
    assert type(processor).__name__ == "Siglip2Processor"
    assert processor.image_processor.patch_size == 8 and processor.image_processor.max_num_patches == 36   # (48/8)^2
    set_patch_budget(processor, 20)
    assert processor.image_processor.max_num_patches == 20
    with pytest.raises(UserError, match="NaFlex .* only"):
        set_patch_budget(build_processor(tokenizer, image_size=16), 20)
    with pytest.raises(UserError, match="positive number of patches"):
        set_patch_budget(processor, 0)
    with pytest.raises(UserError, match="NaFlex models only"):
        build_processor(tokenizer, image_size=32, preset="tiny", max_num_patches=16)


def test_naflex_transform_packs_the_image_processors_own_patches_bit_for_bit(naflex_processor):
    transform = image_transform(naflex_processor)
    budget = naflex_processor.image_processor.max_num_patches
    for _ in range(12):                                       # sizes and aspect ratios of every kind
        width, height = int(torch.randint(8, 90, ())), int(torch.randint(8, 90, ()))
        image = Image.fromarray(torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy())
        packed = transform(image)
        want = naflex_processor.image_processor(images=image, return_tensors="pt")
        rows, columns = want["spatial_shapes"][0].tolist()
        assert packed.shape == (1 + budget, 3 * 8 * 8) and packed.dtype == torch.float32
        assert packed[0, :2].tolist() == [rows, columns] and not packed[0, 2:].any()
        assert torch.equal(packed[1:], want["pixel_values"][0])                 # padding included
        assert rows * columns <= budget and int(want["pixel_attention_mask"][0].sum()) == rows * columns
        # The aspect ratio is kept as far as whole patches allow: the longer side stays the longer (or equal).
        assert (columns >= rows) if width >= height else (columns <= rows)


def test_naflex_images_below_one_patch_are_refused_by_name(naflex_processor):
    from siglip.tokenizer import ImageTooSmall

    transform = image_transform(naflex_processor)
    for size in [(7, 40), (40, 7), (1, 1)]:
        with pytest.raises(ImageTooSmall, match=rf"{size[0]} x {size[1]} image is smaller than one 8 x 8 patch"):
            transform(Image.new("RGB", size))
    assert transform(Image.new("RGB", (8, 8))).shape[0] == 1 + naflex_processor.image_processor.max_num_patches
    copy = pickle.loads(pickle.dumps(transform))                      # DataLoader workers get a copy
    image = Image.new("RGB", (30, 11), (10, 20, 30))
    assert torch.equal(copy(image), transform(image))


def test_text_length_is_the_declared_one_or_the_pipelines():
    from siglip.tokenizer import text_length

    class Declares:
        def __init__(self, length):
            self.model_max_length = length

    assert text_length(Declares(16)) == 16                    # ours: the run's --max-text-length
    assert text_length(Declares(64)) == 64                    # Google's SigLIP v1
    assert text_length(Declares(int(1e30))) == 64             # a Gemma tokenizer declares no real limit
