"""The referring probe: a new decoder on a frozen tower, one location bin per input pixel, a function of its seed, and
the tower left untouched."""

from __future__ import annotations

import random

import torch

from siglip.data import open_source
from siglip.model import build_model
from siglip.siglip2.referring_probe import train_referring_probe
from siglip.tokenizer import build_processor, train_tokenizer


def test_the_probe_trains_a_seeded_decoder_and_leaves_the_tower_alone():
    source = open_source("shapes", split="train", seed=random.randrange(10**6), image_size=32, with_regions=True)
    samples = [source.train_sample(index) for index in range(12)]
    tokenizer = train_tokenizer(source.caption_corpus(200), vocab_size=96, max_length=16)
    processor = build_processor(tokenizer, image_size=32, preset="tiny")
    model = build_model("tiny", vocab_size=len(tokenizer), max_text_length=16)
    tower = {name: value.clone() for name, value in model.state_dict().items()}
    seed = random.randrange(1000)
    first = train_referring_probe(model, processor, samples, text_length=8, steps=3, batch_size=4, seed=seed)
    again = train_referring_probe(model, processor, samples, text_length=8, steps=3, batch_size=4, seed=seed)
    assert first.vocab.bins == 32 and first.text_length == 8 and not first.decoder.training
    assert first.decoder.config.layers == 2 and first.decoder.config.width == 128     # the text tower's, halved
    one, two = first.decoder.state_dict(), again.decoder.state_dict()
    assert all(torch.equal(one[name], two[name]) for name in one)
    untrained = train_referring_probe(model, processor, samples, text_length=8, steps=0, batch_size=4, seed=seed)
    assert any(not torch.equal(one[name], value) for name, value in untrained.decoder.state_dict().items())
    assert all(torch.equal(tower[name], value) for name, value in model.state_dict().items())
