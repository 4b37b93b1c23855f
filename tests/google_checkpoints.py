"""Tiny checkpoints laid out as Google's released ones, built with transformers' own classes; nothing downloaded.

- SigLIP v1 (google/siglip-*): `SiglipModel`, a sentencepiece `spiece.model` read by `SiglipTokenizer` (trained here
  on generated captions), `SiglipImageProcessor`; captions right-padded to 64 with `</s>`, no attention mask.
- SigLIP 2 fixed resolution (google/siglip2-*-224 ...): `SiglipModel` (model_type "siglip"), a Gemma-style
  `tokenizer.json` (BPE with byte fallback, `<eos>` appended, right-padded with `<pad>`, no attention mask), and a
  bilinear `SiglipImageProcessor`.
- SigLIP 2 NaFlex (google/siglip2-*-naflex): `Siglip2Model` (model_type "siglip2"), the same Gemma-style tokenizer,
  `Siglip2ImageProcessor` with a patch budget, in a `Siglip2Processor`.

The conventions (padding side, no mask, add_eos_token, the text config's default token ids) are those of
transformers' conversion scripts for these checkpoints. Towers: width 32, one layer, so a checkpoint builds and
loads in well under a second.
"""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
from pathlib import Path

import torch

WORDS = ["red", "green", "blue", "yellow", "circle", "square", "star", "a", "photo", "of", "the", "small", "large",
         "two", "three", "dog", "cat", "on", "grass"]
"""Generated captions use these words; the class names and templates of the tests below are made of them."""

KINDS = ("siglip", "siglip2", "naflex")
"""SigLIP v1, SigLIP 2 fixed resolution, SigLIP 2 NaFlex."""


def captions(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(count)]


def sentencepiece_tokenizer(texts: list[str]):
    """Google's SigLIP v1 tokenizer: a unigram sentencepiece model (<pad> 0, </s> 1, <unk> 2, no <s>)."""
    import sentencepiece
    from transformers import SiglipTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=80, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2)
    with tempfile.TemporaryDirectory() as folder:      # the tokenizer reads the model file once, when built
        path = Path(folder) / "spiece.model"
        path.write_bytes(model.getvalue())
        # As transformers' conversion of google/siglip-*: the original model takes no attention mask.
        return SiglipTokenizer(vocab_file=str(path), model_input_names=["input_ids"])


def gemma_tokenizer(texts: list[str]):
    """SigLIP 2's tokenizer: Gemma's BPE layout (byte fallback, spaces as "▁"), trained here on `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=96, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], show_progress=False))
    trained = json.loads(backend.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in trained["merges"]]
    # As transformers' conversion of google/siglip2-*: no <bos>, an <eos> at the end, pads on the right, no mask.
    return GemmaTokenizer(vocab=trained["vocab"], merges=merges, add_bos_token=False, add_eos_token=True,
                          padding_side="right", model_input_names=["input_ids"])


def tower_sizes(vocab_size: int) -> tuple[dict, dict]:
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8)
    return text, vision


def build_checkpoint(kind: str, directory: Path, texts: list[str] | None = None, *, image_size: int = 16,
                     num_patches: int = 16, max_num_patches: int = 12) -> Path:
    """Write a tiny checkpoint of `kind` (see KINDS) into `directory`; return it.

    image_size: the fixed-resolution models' side. num_patches: the NaFlex position grid (a square number);
    max_num_patches: its processor's patch budget.
    """
    from transformers import (
        Siglip2Config,
        Siglip2Model,
        Siglip2Processor,
        SiglipConfig,
        SiglipModel,
        SiglipProcessor,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    texts = captions() if texts is None else texts
    directory = Path(directory)
    if kind == "siglip":
        tokenizer = sentencepiece_tokenizer(texts)
    else:
        tokenizer = gemma_tokenizer(texts)
    text, vision = tower_sizes(len(tokenizer))
    if kind == "naflex":
        assert math.isqrt(num_patches) ** 2 == num_patches
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config={**vision, "num_patches": num_patches}))
        processor = Siglip2Processor(
            image_processor=Siglip2ImageProcessorPil(patch_size=8, max_num_patches=max_num_patches),
            tokenizer=tokenizer)
    else:
        # The text config keeps transformers' default token ids (49406, 49407), as Google's config.json files do.
        model = SiglipModel(SiglipConfig(text_config=text, vision_config={**vision, "image_size": image_size}))
        # SigLIP 2's fixed-resolution processors resize bilinearly (resample 2), v1's bicubically (3).
        resample = 2 if kind == "siglip2" else 3
        processor = SiglipProcessor(
            image_processor=SiglipImageProcessorPil(size={"height": image_size, "width": image_size},
                                                    resample=resample),
            tokenizer=tokenizer)
    with torch.no_grad():                               # a trained model's t' and b, not transformers' init
        model.logit_scale.fill_(math.log(random.uniform(5.0, 20.0)))
        model.logit_bias.fill_(random.uniform(-12.0, -2.0))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
