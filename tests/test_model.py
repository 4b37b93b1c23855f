"""The towers: preset sizes, SigLIP's t' and b init, unit-norm encoders, the padding-exact text encoder, loading."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from siglip.errors import UserError
from siglip.model import (
    PIPELINE_TEXT_LENGTH,
    PRESETS,
    build_model,
    encode_images,
    encode_texts,
    load_model,
    model_image_size,
    scale_and_bias,
)


def encoder_layer_params(width: int, mlp: int) -> int:
    """q, k, v, out projections; two MLP matrices; two layer norms (weights and biases everywhere)."""
    return 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 2 * 2 * width


def expected_vision_params(preset, image_size: int) -> int:
    w, m, p = preset.vision_width, preset.vision_mlp, preset.patch_size
    patches = (image_size // p) ** 2
    embeddings = 3 * p * p * w + w + patches * w                       # patch conv and learnt positions
    # attention-pooling head: a probe, nn.MultiheadAttention (packed in-projection), layer norm, MLP
    head = w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * m + m) + (m * w + w)
    return embeddings + preset.vision_layers * encoder_layer_params(w, m) + 2 * w + head


def expected_text_params(preset, vocab_size: int, positions: int) -> int:
    w, m = preset.text_width, preset.text_mlp
    head = w * preset.vision_width + preset.vision_width                # projects to the image embedding width
    return (vocab_size + positions) * w + preset.text_layers * encoder_layer_params(w, m) + 2 * w + head


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", vocab_size=97, max_text_length=16).eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_with_their_sizes(name):
    preset = PRESETS[name]
    vocab_size = 32_000
    with torch.device("meta"):                                          # sizes only: no memory, no init time
        model = build_model(name, vocab_size=vocab_size, max_text_length=64)
    # A NaFlex tower's patch projection is a linear layer where a fixed one has a convolution: the same count.
    assert count(model.vision_model) == expected_vision_params(preset, preset.image_size)
    assert count(model.text_model) == expected_text_params(preset, vocab_size, 64)
    assert model_image_size(model) == preset.image_size
    assert type(model).__name__ == ("Siglip2Model" if preset.naflex else "SiglipModel")
    if preset.naflex:
        assert model.config.vision_config.num_patches == (preset.image_size // preset.patch_size) ** 2
    assert model.config.vision_config.num_hidden_layers == preset.vision_layers
    assert model.config.text_config.num_hidden_layers == preset.text_layers
    if name == "base":   # the paper's B/16 and a 12-layer text tower: google/siglip-base-patch16-224's shape
        assert (preset.vision_width, preset.vision_layers, preset.patch_size, preset.text_layers) == (768, 12, 16, 12)
        assert 200e6 < count(model) < 206e6


def test_tiny_is_a_cpu_model_with_the_chosen_image_size_and_init():
    scale = float(torch.empty(()).uniform_(1, 30))
    bias = float(torch.empty(()).uniform_(-12, 0))
    model = build_model("tiny", vocab_size=1024, max_text_length=16, image_size=64, init_logit_scale=scale,
                        init_logit_bias=bias)
    assert 1.5e6 < count(model) < 2.5e6
    assert model.config.vision_config.image_size == 64
    # The pipeline pads to 64 tokens, so the position table holds at least 64 whatever the caption length.
    assert model.config.text_config.max_position_embeddings == PIPELINE_TEXT_LENGTH
    assert model.training
    t, b = scale_and_bias(model)
    assert t.item() == pytest.approx(scale, rel=1e-6) and b.item() == pytest.approx(bias, abs=1e-6)


def test_logit_scale_and_bias_start_at_the_papers_values_and_carry_gradients(tiny):
    assert torch.allclose(tiny.logit_scale, torch.tensor([math.log(10.0)]))   # HF stores t' = log t
    assert torch.allclose(tiny.logit_bias, torch.tensor([-10.0]))
    t, b = scale_and_bias(tiny)
    assert t.shape == () and b.shape == ()
    assert t.item() == pytest.approx(10.0) and b.item() == pytest.approx(-10.0)
    tiny.zero_grad()
    (3 * t + 2 * b).backward()
    assert tiny.logit_scale.grad.item() == pytest.approx(30.0)                # d(3 exp(t'))/dt' = 3 t
    assert tiny.logit_bias.grad.item() == pytest.approx(2.0)
    tiny.zero_grad()


def test_unknown_preset_and_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="unknown model preset 'huge'.*tiny, small, base, naflex-tiny"):
        build_model("huge", vocab_size=100)
    with pytest.raises(UserError, match="image_size 30 .* multiple of its patch size 8"):
        build_model("tiny", vocab_size=100, image_size=30)
    with pytest.raises(UserError, match="init_logit_scale"):
        build_model("tiny", vocab_size=100, init_logit_scale=0.0)
    # The pipeline pads to 64 tokens: a longer caption would sit elsewhere in transformers than in training.
    with pytest.raises(UserError, match="max text length 65 .*at most --max-text-length 64"):
        build_model("tiny", vocab_size=100, max_text_length=65)


def left_padded(lengths: list[int], length: int, vocab_size: int) -> torch.Tensor:
    """Random captions of the given token counts, left-padded with <pad> = 0 and ending in </s> = 1."""
    rows = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, tokens in enumerate(lengths):
        rows[row, length - tokens:] = torch.randint(3, vocab_size, (tokens,))
        rows[row, -1] = 1
    return rows


def test_encoders_return_unit_rows(tiny):
    n = int(torch.randint(2, 9, ()))
    with torch.no_grad():
        images = encode_images(tiny, torch.randn(n, 3, 32, 32))
        texts = encode_texts(tiny, left_padded(torch.randint(1, 17, (n,)).tolist(), 16, 97))
    assert images.shape == (n, 128) and texts.shape == (n, 128)
    assert torch.allclose(images.norm(dim=1), torch.ones(n), atol=1e-5)
    assert torch.allclose(texts.norm(dim=1), torch.ones(n), atol=1e-5)


def test_text_encoder_equals_the_pipelines_full_length_forward(tiny):
    """Short training ids, trimmed and right-aligned, give what HF computes on the same captions left-padded to
    the 64 tokens the zero-shot pipeline uses, with the attention mask the tokenizer returns."""
    lengths = [2, 5, 11]
    short = left_padded(lengths, 16, 97)
    full = torch.cat([torch.zeros(3, PIPELINE_TEXT_LENGTH - 16, dtype=torch.long), short], dim=1)
    with torch.no_grad():
        ours = encode_texts(tiny, short)
        theirs = tiny.get_text_features(input_ids=full, attention_mask=(full != 0).long()).pooler_output
        # A batch with one caption: 14 columns trimmed, yet the same embedding as in the batch of three.
        alone = encode_texts(tiny, short[:1])
    assert torch.allclose(ours, F.normalize(theirs, dim=-1), atol=1e-5)
    assert torch.allclose(alone, ours[:1], atol=1e-5)
    # The caption matters (the pooled last token is </s> in every row, so this is not trivially true).
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_text_encoder_without_pad_masking_is_hfs_plain_forward(tiny):
    tiny.config.text_config.mask_pad_tokens = False                 # as for Google's SigLIP, which attends to pads
    try:
        ids = left_padded([3, 7], 64, 97)
        with torch.no_grad():
            ours = encode_texts(tiny, ids)
            theirs = F.normalize(tiny.get_text_features(input_ids=ids).pooler_output, dim=-1)
        assert torch.allclose(ours, theirs, atol=1e-6)
    finally:
        tiny.config.text_config.mask_pad_tokens = True


def test_gradients_reach_both_towers(tiny):
    tiny.zero_grad()
    images = encode_images(tiny, torch.randn(3, 3, 32, 32))
    texts = encode_texts(tiny, left_padded([4, 2, 9], 16, 97))
    (images * texts).sum().backward()
    assert tiny.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert tiny.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    tiny.zero_grad()


# ------------------------------------------------------------------------------------------------ load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """A `siglip train`-like DIR: the tiny model and its processor in DIR/final."""
    from siglip.tokenizer import build_processor, train_tokenizer

    final = tmp_path_factory.mktemp("run") / "final"
    tokenizer = train_tokenizer(["a red circle", "two blue squares", "a green star"] * 5, vocab_size=97,
                                max_length=16)
    assert len(tokenizer) <= 97
    tiny.save_pretrained(final)
    build_processor(tokenizer, image_size=32).save_pretrained(final)
    return final


def copy_of(directory, destination):
    shutil.copytree(directory, destination)
    return destination


def test_load_model_reads_a_train_dir_or_its_final(saved, tiny):
    for directory in (saved.parent, saved):
        model, processor = load_model(str(directory))
        assert torch.equal(model.text_model.embeddings.token_embedding.weight,
                           tiny.text_model.embeddings.token_embedding.weight)
        assert scale_and_bias(model)[0].item() == pytest.approx(10.0)
        assert model.config.text_config.mask_pad_tokens is True
        assert processor.image_processor.size["height"] == 32
        assert processor.tokenizer.padding_side == "left"


def test_a_foreign_checkpoint_keeps_its_own_padding(tmp_path, saved):
    """A HF SigLIP whose tokenizer pads on the right and returns no mask (as Google's): no masking, full length."""
    from siglip.tokenizer import text_transform

    directory = copy_of(saved, tmp_path / "foreign")
    config = json.loads((directory / "config.json").read_text())
    del config["text_config"]["mask_pad_tokens"]
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.update(padding_side="right", model_input_names=["input_ids"], model_max_length=64)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    model, processor = load_model(str(directory))
    assert model.config.text_config.mask_pad_tokens is False
    ids = text_transform(processor)("a red circle")
    assert ids.shape == (PIPELINE_TEXT_LENGTH,) and ids[-1] == processor.tokenizer.pad_token_id   # right-padded
    piped = processor.tokenizer(["a red circle"], padding="max_length", max_length=64, truncation=True,
                                return_tensors="pt")
    assert set(piped) == {"input_ids"}
    with torch.no_grad():
        ours = encode_texts(model, ids[None])
        theirs = F.normalize(model.get_text_features(**piped).pooler_output, dim=-1)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_wrong_directories_raise_user_errors_naming_what_was_found(tmp_path, saved):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path / "empty"))

    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "bert")
    with pytest.raises(UserError, match="'bert' model .*BertConfig|'bert' model"):
        load_model(str(tmp_path / "bert"))

    pickled = copy_of(saved, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")   # never opened: a pickle is not read
    with pytest.raises(UserError, match=r"only pickle weights \(pytorch_model.bin\).*never unpickles"):
        load_model(str(pickled))
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="no weights"):
        load_model(str(pickled))


@pytest.mark.parametrize("change", ["reshaped", "missing"])
def test_weights_that_do_not_fit_the_config_are_a_user_error(tmp_path, saved, change):
    from safetensors.torch import load_file, save_file

    directory = copy_of(saved, tmp_path / change)
    tensors = load_file(directory / "model.safetensors")
    name = "text_model.embeddings.token_embedding.weight"
    if change == "reshaped":
        tensors[name] = torch.zeros(tensors[name].shape[0] + 5, tensors[name].shape[1])
    else:
        del tensors[name]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="cannot load the SiglipModel weights|does not fit its SiglipModel config"):
        load_model(str(directory))


# ------------------------------------------------------------------------------------------------ NaFlex


def mixed_images(count: int) -> list:
    """Random images of mixed sizes and aspect ratios (tall, wide, square), all at least one 8 px patch."""
    from PIL import Image

    sides = [(int(torch.randint(8, 70, ())), int(torch.randint(8, 70, ()))) for _ in range(count)]
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy()) for w, h in sides]


def test_pack_and_unpack_are_inverse_and_trim_only_padding():
    from siglip.model import pack_patches, unpack_patches

    budget, width = 12, 3 * 8 * 8
    grids = [(1, 1), (3, 4), (2, 5), (1, 12)]
    patches = [torch.randn(budget, width) for _ in grids]
    for grid, rows in zip(grids, patches, strict=True):
        rows[grid[0] * grid[1]:] = 0                                   # the processor's padding
    packed = torch.stack([pack_patches(rows, grid) for rows, grid in zip(patches, grids, strict=True)])
    pixel_values, mask, shapes = unpack_patches(packed)
    assert shapes.tolist() == [list(grid) for grid in grids] and shapes.dtype == torch.int64
    assert pixel_values.shape == (4, 12, width) and mask.dtype == torch.int32
    assert mask.sum(dim=1).tolist() == [1, 12, 10, 12]
    assert torch.equal(pixel_values, torch.stack(patches))
    trimmed, trimmed_mask, _ = unpack_patches(packed[:1])                # one 1 x 1 image: a single patch column
    assert trimmed.shape == (1, 1, width) and trimmed_mask.tolist() == [[1]]
    with pytest.raises(ValueError, match="rows \\* columns <= P"):
        pack_patches(torch.randn(4, width), (3, 2))


def test_naflex_encoder_equals_transformers_siglip2_on_the_same_images(tmp_path):
    """A NaFlex checkpoint made with transformers' own classes: our packed, trimmed forward of a batch of mixed
    sizes and aspect ratios gives what Siglip2Model gives on the processor's padded batch (float32)."""
    from google_checkpoints import build_checkpoint
    from siglip.tokenizer import image_transform

    model, processor = load_model(str(build_checkpoint("naflex", tmp_path / "naflex", num_patches=16,
                                                       max_num_patches=int(torch.randint(4, 30, ())))))
    assert type(model).__name__ == "Siglip2Model"
    images = mixed_images(6)
    to_pixels = image_transform(processor)
    with torch.no_grad():
        ours = encode_images(model, torch.stack([to_pixels(image) for image in images]))
        inputs = processor.image_processor(images=images, return_tensors="pt")
        theirs = F.normalize(model.get_image_features(**inputs).pooler_output, dim=-1)
        # One image alone (its own padding, its own position grid) gives its row of the batch.
        alone = encode_images(model, to_pixels(images[2])[None])
    # The same float32 operations on fewer padding columns (masked): measured below 1e-6.
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert torch.allclose(alone, ours[2:3], atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3                        # the images matter


def test_naflex_preset_trains_through_both_towers():
    model = build_model("naflex-tiny", vocab_size=50, max_text_length=8, image_size=24)
    assert model.config.vision_config.num_patches == 9 and model_image_size(model) == 24
    from siglip.model import pack_patches

    grids = [(3, 3), (2, 4), (1, 7)]                                     # a budget of 9 patches, mixed shapes
    packed = torch.stack([pack_patches(torch.randn(9, 192), grid) for grid in grids])
    images = encode_images(model, packed)
    texts = encode_texts(model, left_padded([3, 5, 2], 8, 50))
    (images * texts).sum().backward()
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.vision_model.embeddings.position_embedding.weight.grad.abs().sum() > 0
    assert model.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="packed"):
        encode_images(model, torch.randn(2, 3, 24, 24))                 # fixed-resolution pixels


# ------------------------------------------------------------------------------------- Google's conventions


@pytest.mark.parametrize("kind", ["siglip", "siglip2", "naflex"])
def test_google_checkpoints_encode_text_as_transformers_does_on_their_tokenizers_output(tmp_path, kind):
    """Right-padded to 64 with the pad (v1: </s>) token, no attention mask: every position attended, the last
    pooled; and the text config gets the tokenizer's own ids in place of transformers' 49406 / 49407."""
    from google_checkpoints import build_checkpoint
    from siglip.tokenizer import text_transform

    model, processor = load_model(str(build_checkpoint(kind, tmp_path / kind)))
    tokenizer = processor.tokenizer
    text_config = model.config.text_config
    assert text_config.mask_pad_tokens is False
    assert (text_config.pad_token_id, text_config.eos_token_id, text_config.bos_token_id) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    captions = ["a red circle", "Two large dogs on the grass", "star"]
    to_ids = text_transform(processor)
    ids = torch.stack([to_ids(caption) for caption in captions])
    piped = tokenizer(captions, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    assert set(piped) == {"input_ids"} and torch.equal(ids, piped["input_ids"])    # what the pipeline feeds
    assert (ids[:, -1] == tokenizer.pad_token_id).all()                               # padded on the right
    with torch.no_grad():
        ours = encode_texts(model, ids)
        theirs = F.normalize(model.get_text_features(**piped).pooler_output, dim=-1)
    assert torch.equal(ours, theirs)


def test_a_right_padding_tokenizer_with_a_mask_is_computed_as_transformers_does(tmp_path, saved):
    directory = copy_of(saved, tmp_path / "right")
    config = json.loads((directory / "config.json").read_text())
    del config["text_config"]["mask_pad_tokens"]                        # not a checkpoint of ours
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.update(padding_side="right", model_max_length=64)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    model, processor = load_model(str(directory))
    assert model.config.text_config.mask_pad_tokens is True and model.config.text_config.padding_side == "right"
    piped = processor.tokenizer(["a red circle", "two blue squares"], padding="max_length", max_length=64,
                                return_tensors="pt")
    with torch.no_grad():
        ours = encode_texts(model, piped["input_ids"])
        theirs = F.normalize(model.get_text_features(**piped).pooler_output, dim=-1)
    assert torch.equal(ours, theirs)
