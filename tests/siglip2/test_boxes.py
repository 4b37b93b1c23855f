"""Box tokens round-trip within half a bin; the three LocCa target sequences are laid out and scored as stated; a
sample's targets (all tasks, as SigLIP 2 trains) stack into rows by task."""

from __future__ import annotations

import random

import pytest
import torch

from siglip.data.sample import Region
from siglip.siglip2.boxes import (
    CAPTION,
    GROUND,
    REFER,
    TASKS,
    DecoderVocabulary,
    caption_target,
    dequantise,
    ground_target,
    normalise_box,
    pad_targets,
    quantise,
    refer_prompt,
    refer_target,
    sample_target,
    sample_targets,
    stack_targets,
)


def random_box() -> tuple[float, float, float, float]:
    x0, x1 = sorted(random.random() for _ in range(2))
    y0, y1 = sorted(random.random() for _ in range(2))
    return (random.choice([0.0, x0]), y0, x1, random.choice([1.0, y1]))       # the edges 0 and 1 included


def random_ids(vocab: DecoderVocabulary, length: int) -> list[int]:
    return [random.randrange(3, vocab.text_size) for _ in range(length - 1)] + [vocab.eos_id]


def test_a_coordinate_round_trips_within_half_a_bin():
    for _ in range(200):
        bins = random.randint(2, 1000)
        coordinates = [0.0, 1.0, *(random.random() for _ in range(50)), *(k / bins for k in range(bins + 1))]
        for coordinate in coordinates:
            index = quantise(coordinate, bins)
            assert 0 <= index < bins
            assert abs(dequantise(index, bins) - coordinate) <= 0.5 / bins + 1e-15
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        quantise(1.0001, 100)


def test_box_tokens_are_location_tokens_and_round_trip():
    vocab = DecoderVocabulary(text_size=random.randint(10, 5000), bins=random.randint(2, 500))
    for _ in range(200):
        box = random_box()
        tokens = vocab.box_tokens(box)
        assert all(vocab.location_start <= token < vocab.location_start + vocab.bins for token in tokens)
        decoded = vocab.box_from_tokens(tokens)
        assert max(abs(a - b) for a, b in zip(decoded, box, strict=True)) <= 0.5 / vocab.bins + 1e-15
    with pytest.raises(ValueError, match="not all location tokens"):
        vocab.box_from_tokens([vocab.eos_id, *vocab.box_tokens(random_box())[1:]])


def test_the_vocabulary_is_text_then_locations_then_tasks():
    vocab = DecoderVocabulary(text_size=300, bins=200)
    assert vocab.size == 503 and vocab.location_start == 300
    assert [vocab.task_id(task) for task in TASKS] == [500, 501, 502]
    with pytest.raises(ValueError, match="task must be one of"):
        vocab.task_id("detect")
    with pytest.raises(ValueError, match="pad_id"):
        DecoderVocabulary(text_size=10, pad_id=10)


def test_the_three_targets_hold_their_parts_in_order_and_score_only_the_answer():
    vocab = DecoderVocabulary(text_size=random.randint(50, 500), bins=random.randint(10, 300))
    caption, phrase, box = random_ids(vocab, random.randint(1, 12)), random_ids(vocab, random.randint(1, 6)), \
        random_box()
    box_tokens = vocab.box_tokens(box)

    target = caption_target(vocab, caption)
    assert target.tokens == (vocab.task_id(CAPTION), *caption) and target.task == CAPTION
    assert target.scored == (False,) + (True,) * len(caption)

    target = refer_target(vocab, phrase, box)
    assert target.tokens == (vocab.task_id(REFER), *phrase, *box_tokens, vocab.eos_id)
    assert target.scored == (False,) * (1 + len(phrase)) + (True,) * 5
    assert list(target.tokens[:1 + len(phrase)]) == refer_prompt(vocab, phrase)

    target = ground_target(vocab, box, phrase)
    assert target.tokens == (vocab.task_id(GROUND), *box_tokens, *phrase)
    assert target.scored == (False,) * 5 + (True,) * len(phrase)

    with pytest.raises(ValueError, match="caption_ids must be text ids"):
        caption_target(vocab, [vocab.location_start])
    with pytest.raises(ValueError, match="phrase_ids is empty"):
        refer_target(vocab, [], box)


def test_a_sample_without_regions_is_captioned_and_one_with_regions_gets_every_task():
    vocab = DecoderVocabulary(text_size=128, bins=64)
    encode = lambda text: [3 + ord(letter) % 100 for letter in text] + [vocab.eos_id]  # noqa: E731
    width, height = random.randint(16, 100), random.randint(16, 100)
    region = Region(box=(2.0, 3.0, width - 1.0, height / 2), phrase="the red circle", labels={}, coverage=None)
    rng = random.Random(random.randrange(10**6))
    for regions in (None, []):
        assert {sample_target(vocab, "a caption", regions, (width, height), encode, rng).task for _ in range(30)} \
            == {CAPTION}
    drawn = [sample_target(vocab, "a caption", [region], (width, height), encode, rng) for _ in range(300)]
    counts = {task: sum(target.task == task for target in drawn) for task in TASKS}
    assert min(counts.values()) > 60                              # uniform: about 100 each
    box_tokens = vocab.box_tokens(normalise_box(region.box, width, height))
    for target in drawn:
        if target.task == REFER:
            assert target == refer_target(vocab, encode(region.phrase), normalise_box(region.box, width, height))
            assert list(target.tokens[-5:-1]) == box_tokens
        elif target.task == GROUND:
            assert list(target.tokens[1:5]) == box_tokens
    seed = random.randrange(10**6)
    again = [sample_target(vocab, "a caption", [region], (width, height), encode, random.Random(seed))
             for _ in range(2)]
    assert again[0] == again[1]                                   # the same rng state draws the same target
    assert sample_target(vocab, "a caption", [region], (width, height), encode, rng, tasks=[GROUND]).task == GROUND
    with pytest.raises(ValueError, match="all need regions"):
        sample_target(vocab, "a caption", None, (width, height), encode, rng, tasks=[REFER])


def test_padding_fills_the_right_and_is_never_scored():
    vocab = DecoderVocabulary(text_size=100, bins=32)
    targets = [caption_target(vocab, random_ids(vocab, random.randint(1, 10))) for _ in range(6)]
    length = random.randint(4, 14)
    tokens, scored = pad_targets(targets, length)
    assert tokens.shape == scored.shape == (6, length) and tokens.dtype == torch.int64
    for row, target in enumerate(targets):
        kept = min(length, len(target.tokens))
        assert tokens[row, :kept].tolist() == list(target.tokens[:kept])
        assert scored[row, :kept].tolist() == list(target.scored[:kept])
        assert (tokens[row, kept:] == vocab.pad_id).all() and not scored[row, kept:].any()


def test_every_task_of_a_sample_in_task_order_and_the_caption_alone_without_regions():
    vocab = DecoderVocabulary(text_size=128, bins=64)
    encode = lambda text: [3 + ord(letter) % 100 for letter in text] + [vocab.eos_id]  # noqa: E731
    width, height = random.randint(16, 100), random.randint(16, 100)
    regions = [Region(box=(random.uniform(0, width / 2), random.uniform(0, height / 2), width - 1.0, height - 1.0),
                      phrase=f"object {k}", labels={}, coverage=None) for k in range(random.randint(1, 3))]
    for without in (None, []):
        assert sample_targets(vocab, "a caption", without, (width, height), encode, random.Random(0)) == \
            [caption_target(vocab, encode("a caption"))]
    seed = random.randrange(10**6)
    targets = sample_targets(vocab, "a caption", regions, (width, height), encode, random.Random(seed))
    assert [target.task for target in targets] == list(TASKS)
    # The two box tasks each draw their region from the rng, in that order.
    rng = random.Random(seed)
    refer_region, ground_region = rng.choice(regions), rng.choice(regions)
    assert targets[1] == refer_target(vocab, encode(refer_region.phrase),
                                      normalise_box(refer_region.box, width, height))
    assert targets[2] == ground_target(vocab, normalise_box(ground_region.box, width, height),
                                       encode(ground_region.phrase))
    assert targets == sample_targets(vocab, "a caption", regions, (width, height), encode, random.Random(seed))


def test_stacked_targets_sit_in_their_tasks_row_and_missing_tasks_are_never_scored():
    vocab = DecoderVocabulary(text_size=100, bins=32)
    box = random_box()
    with_regions = [caption_target(vocab, random_ids(vocab, 5)), refer_target(vocab, random_ids(vocab, 3), box),
                    ground_target(vocab, box, random_ids(vocab, 4))]
    caption_only = [caption_target(vocab, random_ids(vocab, 7))]
    length = random.randint(9, 14)
    tokens, scored = stack_targets([with_regions, caption_only, []], length, vocab.pad_id)
    assert tokens.shape == scored.shape == (3, len(TASKS), length)
    want_tokens, want_scored = pad_targets(with_regions, length, vocab.pad_id)
    assert torch.equal(tokens[0], want_tokens) and torch.equal(scored[0], want_scored)
    caption_row = TASKS.index(CAPTION)
    assert torch.equal(tokens[1, caption_row], pad_targets(caption_only, length)[0][0])
    others = [row for row in range(len(TASKS)) if row != caption_row]
    assert (tokens[1, others] == vocab.pad_id).all() and not scored[1, others].any()
    assert (tokens[2] == vocab.pad_id).all() and not scored[2].any()


def test_the_text_encoder_ends_in_the_end_token_and_the_longest_target_fits():
    from siglip.siglip2.boxes import TextEncoder, longest_target
    from siglip.tokenizer import train_tokenizer

    captions = [" ".join(random.choice(["red", "blue", "circle", "star", "left", "of"]) for _ in range(8))
                for _ in range(200)]
    tokenizer = train_tokenizer(captions, vocab_size=64, max_length=16)
    length = random.randint(3, 8)
    encode = TextEncoder(tokenizer, length)
    vocab = DecoderVocabulary(text_size=len(tokenizer), bins=16, pad_id=tokenizer.pad_token_id,
                              eos_id=tokenizer.eos_token_id)
    for caption in captions[:20]:
        ids = encode(caption)
        assert 1 <= len(ids) <= length and ids[-1] == tokenizer.eos_token_id
        whole = tokenizer(caption, padding=False)["input_ids"]
        assert ids[:-1] == whole[:len(ids) - 1]                    # a prefix of the whole caption's ids
        assert len(refer_target(vocab, ids, random_box()).tokens) <= longest_target(length)
        assert len(ground_target(vocab, random_box(), ids).tokens) <= longest_target(length)
        assert len(caption_target(vocab, ids).tokens) <= longest_target(length)
