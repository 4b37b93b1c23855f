"""The tokenizer and processor: a BPE trained on captions, saved inside a `SiglipProcessor`.

The processor (tokenizer + image processor) is saved beside the model, so that `AutoProcessor.from_pretrained`
and `transformers.pipeline("zero-shot-image-classification", model=DIR)` tokenise and resize exactly as training
did. Two conventions make that hold (see `siglip.model` for the model side):

- every caption is padded to the full `max_length` on the LEFT and ends with the end token `</s>`, so the last
  position, which SigLIP's text tower pools, always holds `</s>` (transformers issue #39269: with right padding
  the pooled token is a pad);
- the tokenizer returns an attention mask, so the pipeline masks pad keys as `siglip.model.encode_texts` does.
  With pads masked and every caption's tokens ending at the last position, the pipeline's 64-token padding and
  a shorter training length give the same embedding (`siglip.model` explains the position alignment); with
  max_length = 64 a hand-written `processor(text, padding="max_length")` call matches too.

The alphabet is the corpus's characters (the most frequent ones, if there are more than the vocabulary holds);
a character never seen in training becomes `<unk>`.

A checkpoint's own tokenizer (Google's sentencepiece or Gemma tokenizer, right-padded to 64 tokens without a
mask) is used as it is: the same text gives the same ids before and after fine-tuning.

Images: a fixed-resolution processor resizes to S x S; a NaFlex processor (`Siglip2ImageProcessor`) resizes each
image, keeping its aspect ratio, to the most patches its budget allows and pads the patch sequence to the budget.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, SiglipProcessor

from siglip.errors import UserError
from siglip.model import EOS_TOKEN_ID, PAD_TOKEN_ID, PIPELINE_TEXT_LENGTH, PRESETS, check_text_length, pack_patches

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
"""In id order: `<pad>` = 0, `</s>` = 1 (`siglip.model.PAD_TOKEN_ID`, `EOS_TOKEN_ID`), `<unk>` = 2."""

MIN_VOCAB_SIZE = 16
"""The special tokens and a minimal alphabet."""

MAX_TRAINING_CAPTIONS = 200_000
"""More captions than this are subsampled (seeded) before BPE training, which keeps training to seconds."""

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
"""SigLIP's pixel normalisation: [0, 255] -> [-1, 1]."""


def train_tokenizer(
    captions: list[str], *, vocab_size: int, max_length: int = PIPELINE_TEXT_LENGTH, seed: int = 0
) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on `captions`: lower-cased, left-padded to `max_length`, every caption ending in </s>.

    Args:
        captions: training text; duplicates count (BPE merges frequent pairs first).
        vocab_size: at most this many tokens (3 special tokens, the alphabet, merges); a small corpus may yield
            fewer: size the model with `len(tokenizer)`.
        max_length: tokens per caption after padding and truncation, 2 to 64 (the pipeline's length: the export
            pads to it, and a caption of at most max_length tokens then has the same embedding as in training).
        seed: picks the subsample when there are more than `MAX_TRAINING_CAPTIONS` captions.

    Returns:
        A `PreTrainedTokenizerFast`; the same captions and seed give the same tokenizer (BPE training breaks
        ties deterministically).
    """
    captions = [caption for caption in captions if caption and caption.strip()]
    if not captions:
        raise UserError("train_tokenizer got no non-empty captions; check the data source's caption_corpus")
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    check_text_length(max_length)
    if len(captions) > MAX_TRAINING_CAPTIONS:
        captions = random.Random(seed).sample(captions, MAX_TRAINING_CAPTIONS)

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # Lower case: class names in prompts ("Red") and captions ("red") should meet as the same tokens.
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Words keep their leading-space marker (as in SentencePiece); punctuation stands apart from words.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=vocab_size - len(SPECIAL_TOKENS),   # so the alphabet alone never exceeds the vocabulary
        show_progress=False,
    )
    backend.train_from_iterator(captions, trainer)
    if backend.token_to_id("<pad>") != PAD_TOKEN_ID or backend.token_to_id("</s>") != EOS_TOKEN_ID:
        raise RuntimeError("BPE training did not put <pad>, </s> at ids 0, 1; siglip.model relies on them")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_TOKEN_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        truncation_side="right",
        model_max_length=max_length,
        # SiglipModel takes no token_type_ids; the mask lets the pipeline mask pads as training does.
        model_input_names=["input_ids", "attention_mask"],
    )


def load_tokenizer(directory: str, *, max_length: int = PIPELINE_TEXT_LENGTH) -> PreTrainedTokenizerBase:
    """A tokenizer saved earlier (ours, or another fast tokenizer), set up to pad on the left to `max_length`.

    `directory` may be a tokenizer directory, a model directory with processor files, or a `siglip train` DIR.
    The tokenizer must define a pad token. Use `len(tokenizer)` and `tokenizer.pad_token_id` for `build_model`.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(directory):
        raise UserError(f"tokenizer directory {directory!r} does not exist")
    final = os.path.join(directory, "final")
    if not _holds_processor(directory) and _holds_processor(final):
        directory = final
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"cannot load a tokenizer from {directory!r}: {error}") from error
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer in {directory!r} has no pad token; set one (tokenizer.pad_token = ...)")
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = max_length
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    *,
    image_size: int,
    image_mean: tuple[float, float, float] = SIGLIP_MEAN,
    image_std: tuple[float, float, float] = SIGLIP_STD,
    preset: str | None = None,
    max_num_patches: int | None = None,
):
    """A processor: `tokenizer` plus an image processor that scales pixels to [0, 1] and normalises them by
    `image_mean` / `image_std` (SigLIP's: to [-1, 1]).

    For a fixed-resolution model (`preset` None or not NaFlex) a `SiglipProcessor` that resizes (bicubic) to
    image_size x image_size. For a NaFlex preset a `Siglip2Processor` whose image processor resizes each image
    (bilinear), keeping its aspect ratio, to at most `max_num_patches` patches of the preset's patch size (default:
    as many as a square image_size x image_size image has) and pads the patch sequence to that budget.
    """
    if image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
    if preset is not None and preset in PRESETS and PRESETS[preset].naflex:
        from transformers import Siglip2Processor

        patch_size = PRESETS[preset].patch_size
        budget = max_num_patches if max_num_patches is not None else (image_size // patch_size) ** 2
        _check_patch_budget(budget)
        image_processor = _naflex_image_processor_class()(
            patch_size=patch_size, max_num_patches=budget, image_mean=list(image_mean), image_std=list(image_std))
        return Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    if max_num_patches is not None:
        raise UserError(f"a patch budget (max_num_patches {max_num_patches}) applies to NaFlex models only; "
                        f"preset {preset!r} has a fixed resolution: set its --image-size instead")
    try:  # transformers 5 names the PIL implementation apart from the torchvision one (torchvision is absent here)
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x: SiglipImageProcessor is the PIL one
        from transformers import SiglipImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=list(image_mean), image_std=list(image_std)
    )
    return SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def set_patch_budget(processor, max_num_patches: int) -> None:
    """Give a NaFlex processor a new patch budget (at most this many patches an image); UserError for a
    fixed-resolution processor."""
    if not _is_naflex_image_processor(processor.image_processor):
        raise UserError(f"a patch budget (max_num_patches {max_num_patches}) applies to NaFlex (SigLIP 2, "
                        f"model_type 'siglip2') checkpoints only; this one has a "
                        f"{type(processor.image_processor).__name__} of fixed resolution")
    _check_patch_budget(max_num_patches)
    processor.image_processor.max_num_patches = max_num_patches


def _check_patch_budget(max_num_patches: int) -> None:
    if not isinstance(max_num_patches, int) or max_num_patches < 1:
        raise UserError(f"the patch budget (max_num_patches) must be a positive number of patches, "
                        f"got {max_num_patches!r}")


def _naflex_image_processor_class() -> type:
    try:  # the PIL implementation where transformers 5 names it apart from the torchvision one
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
        return Siglip2ImageProcessorPil
    except ImportError:
        from transformers import Siglip2ImageProcessor
        return Siglip2ImageProcessor


def _is_naflex_image_processor(image_processor) -> bool:
    return hasattr(image_processor, "max_num_patches") and hasattr(image_processor, "patch_size")


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "config.json")


def load_processor(directory: str) -> SiglipProcessor:
    """The processor saved in a directory: processor files alone, a model directory (a DIR/final, a HF checkpoint),
    or a `siglip train` DIR (its DIR/final is used)."""
    from transformers import AutoProcessor

    if not os.path.isdir(directory):
        raise UserError(f"processor directory {directory!r} does not exist")
    final = os.path.join(directory, "final")
    if not _holds_processor(directory) and _holds_processor(final):
        directory = final
    try:
        return AutoProcessor.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"cannot load the processor files in {directory!r}: {error}") from error


def _holds_processor(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in PROCESSOR_FILES)


def text_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens per caption: the length the tokenizer declares (ours: the run's --max-text-length; Google's SigLIP
    v1: 64), or the pipeline's 64 where it declares none (a Gemma tokenizer declares 10^30)."""
    declared = tokenizer.model_max_length
    if not declared or declared > 100_000:
        return PIPELINE_TEXT_LENGTH
    return int(declared)


def tokenize(processor: SiglipProcessor, captions: list[str]) -> torch.Tensor:
    """Captions -> (n, L) int64 token ids, padded and truncated to the full length exactly as the pipeline does."""
    tokenizer = processor.tokenizer
    encoded = tokenizer(
        list(captions), padding="max_length", max_length=text_length(tokenizer), truncation=True, return_tensors="pt"
    )
    return encoded["input_ids"].long()


class TextTransform:
    """Picklable caption -> (L,) int64 token ids; L = the tokenizer's full length. Runs in DataLoader workers.

    For a plain `PreTrainedTokenizerFast` (ours, and most saved fast tokenizers) the caption goes straight to a
    copy of its Rust tokenizer, set once to the padding and truncation that `tokenize` asks of the wrapper: the
    same ids (tests/test_tokenizer.py checks it) without the wrapper's per-call argument handling, which costs as
    much again as the encoding itself. Other tokenizers are called as they are.
    """

    def __init__(self, processor: SiglipProcessor):
        self.tokenizer = processor.tokenizer
        self.length = text_length(self.tokenizer)
        self.encoder = _fixed_length_encoder(self.tokenizer, self.length)

    def __call__(self, caption: str) -> torch.Tensor:
        if self.encoder is not None:
            return torch.tensor(self.encoder.encode(caption).ids, dtype=torch.long)
        ids = self.tokenizer(caption, padding="max_length", max_length=self.length, truncation=True)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)


def _fixed_length_encoder(tokenizer: PreTrainedTokenizerBase, length: int) -> Tokenizer | None:
    """A copy of a fast tokenizer's Rust tokenizer that pads and truncates to `length` as the wrapper does with
    padding="max_length", truncation=True; None for any tokenizer other than a plain PreTrainedTokenizerFast."""
    if type(tokenizer) is not PreTrainedTokenizerFast or tokenizer.pad_token_id is None:
        return None
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())    # configuring it leaves the wrapper alone
    encoder.enable_truncation(max_length=length, direction=tokenizer.truncation_side)
    encoder.enable_padding(length=length, direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                           pad_token=tokenizer.pad_token)
    return encoder


class ImageTransform:
    """Picklable PIL image -> (3, S, S) float32 pixel values, exactly as the processor's image processor makes them.

    An RGB image already of the processor's size (every `shapes` and `digits` image, and any data exported at the
    model's size) skips the image processor's per-call machinery: its resize is then the identity, and the
    rescale and normalisation are computed here with the processor's own constants and the same float64-then-
    float32 arithmetic, so the pixels are bitwise those of the processor (tests/test_tokenizer.py checks it).
    That machinery costs about 0.2 ms an image on one core (against 2.2 ms of model work a sample in the tiny
    preset's step), and on 2 cores a DataLoader worker's time comes out of the step. Any other image, or a
    processor configured in a way this does not mirror, goes through the processor itself.
    """

    def __init__(self, processor: SiglipProcessor):
        self.image_processor = processor.image_processor
        direct = _direct_normalisation(self.image_processor)
        self.size, self.scale, self.mean, self.std = direct if direct is not None else (None, None, None, None)

    def __call__(self, image) -> torch.Tensor:
        if self.size is not None and isinstance(image, Image.Image) and image.mode == "RGB" \
                and image.size == self.size:
            pixels = (np.asarray(image, dtype=np.float64) * self.scale).astype(np.float32)     # (S, S, 3)
            pixels = (pixels - self.mean) / self.std
            return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class ImageTooSmall(UserError):
    """An image narrower or lower than one NaFlex patch: it has no patch to embed. The training loader skips and
    counts it (kind "image_too_small"), evaluation skips and counts it, --strict stops on it."""

    kind = "image_too_small"


class NaFlexImageTransform:
    """Picklable PIL image -> (1 + P, 3 p^2) float32 packed NaFlex patches (`siglip.model.pack_patches`).

    The patches are those of the processor's own image processor (`Siglip2ImageProcessor`): the image resized,
    keeping its aspect ratio, to the largest patch grid within the budget P, rescaled, normalised and cut into
    patches, padded to P; the grid goes into row 0. An image narrower or lower than one patch is refused with
    `ImageTooSmall` (the processor would blow it up to a whole patch of interpolated colour).
    """

    def __init__(self, processor):
        self.image_processor = processor.image_processor
        self.patch_size = int(self.image_processor.patch_size)

    def __call__(self, image) -> torch.Tensor:
        width, height = image.size
        if min(width, height) < self.patch_size:
            raise ImageTooSmall(f"a {width} x {height} image is smaller than one {self.patch_size} x "
                                f"{self.patch_size} patch of the NaFlex model")
        output = self.image_processor(images=image, return_tensors="pt")
        rows, columns = (int(value) for value in output["spatial_shapes"][0])
        return pack_patches(output["pixel_values"][0], (rows, columns))


def _direct_normalisation(image_processor) -> tuple[tuple[int, int], float, np.ndarray, np.ndarray] | None:
    """((width, height), rescale factor, mean, std) of an image processor whose whole work on an image of that
    size is `(pixels * factor - mean) / std`; None when it does anything else (crops, pads, keeps its own resize
    rules, skips the rescale or the normalisation), which then runs it in full."""
    size = getattr(image_processor, "size", None)
    # transformers 5 keeps a SizeDict (attributes, unset ones None); earlier versions a plain dict.
    fields = dict(size) if isinstance(size, dict) else vars(size) if size is not None else {}
    height, width = fields.get("height"), fields.get("width")
    mirrored = (
        type(image_processor).__name__ in ("SiglipImageProcessor", "SiglipImageProcessorPil")
        and getattr(image_processor, "do_resize", False) and isinstance(height, int) and isinstance(width, int)
        and all(value is None for key, value in fields.items() if key not in ("height", "width"))
        and getattr(image_processor, "do_rescale", False) and getattr(image_processor, "do_normalize", False)
        and not getattr(image_processor, "do_center_crop", False) and not getattr(image_processor, "do_pad", False)
    )
    if not mirrored:
        return None
    mean = np.broadcast_to(np.asarray(image_processor.image_mean, dtype=np.float32), (3,)).copy()
    std = np.broadcast_to(np.asarray(image_processor.image_std, dtype=np.float32), (3,)).copy()
    return (width, height), float(image_processor.rescale_factor), mean, std


def text_transform(processor: SiglipProcessor) -> TextTransform:
    """The caption transform for `siglip.data.make_train_loader`: caption -> input_ids (L,) int64."""
    return TextTransform(processor)


def image_transform(processor) -> ImageTransform | NaFlexImageTransform:
    """The image transform for `siglip.data.make_train_loader`: PIL image -> pixel_values, (3, S, S) float32, or
    for a NaFlex processor (1 + P, 3 p^2) packed patches."""
    if _is_naflex_image_processor(processor.image_processor):
        return NaFlexImageTransform(processor)
    return ImageTransform(processor)
