"""siglip.train.captions: captions longer than the text length are found (and PairTransform reports them)."""

from __future__ import annotations

import random

import torch
from PIL import Image

from siglip.data import Sample
from siglip.tokenizer import build_processor, train_tokenizer
from siglip.train.captions import TruncationCheck, truncation_line
from siglip.train.step import PairTransform

WORDS = ["red", "green", "blue", "circle", "square", "star", "small", "large", "left", "right"]


def test_captions_longer_than_the_text_length_are_flagged():
    length = random.randint(5, 9)
    corpus = [" ".join(random.choices(WORDS, k=random.randint(1, 12))) for _ in range(300)]
    tokenizer = train_tokenizer(corpus, vocab_size=64, max_length=length)
    processor = build_processor(tokenizer, image_size=16)
    transform, check = PairTransform(processor), TruncationCheck(tokenizer, length)
    image = Image.new("RGB", (16, 16), "red")
    seen = set()
    for caption in corpus[:120]:
        # The caption's own token count (its end token included) decides, as the tokenizer sees it.
        tokens = len(tokenizer(caption)["input_ids"])
        output = transform(Sample(image=image, caption=caption, key="k"))
        assert output["caption_truncated"].dtype == torch.bool and output["caption_truncated"].shape == ()
        assert bool(output["caption_truncated"]) == check(caption) == (tokens > length), (caption, tokens)
        seen.add(tokens > length)
        if tokens == length:
            assert not check(caption)                        # exactly full is not cut short
    assert seen == {True, False}


def test_the_summary_line_counts_and_says_what_to_do():
    assert truncation_line(0, 640, 16, True) == "captions cut short at 16 tokens: none"
    line = truncation_line(64, 640, 16, True)
    assert line.startswith("captions cut short at 16 tokens: 64 of 640 (10.0%)") and "--max-text-length" in line
    assert "--init" in truncation_line(3, 640, 64, False)
