"""The two towers: Hugging Face SigLIP presets, SigLIP's t' and b init, the encoders, and loading checkpoints.

A model here is a plain `transformers.SiglipModel`: a ViT image tower whose attention-pooling head gives one
embedding per image, and a text transformer that pools its LAST token (Zhai et al., 2023, sec. 2; the HF port
keeps big_vision's pooling). The NaFlex presets build a `transformers.Siglip2Model` (SigLIP 2, Tschannen et al.,
2025, sec. 2.4): the same text tower, and an image tower that takes each image at its own aspect ratio as a padded
sequence of patches, its position embeddings resized to each image's patch grid by transformers. The loss is not
the model's: training calls `encode_images` / `encode_texts` and hands the embeddings to `siglip.loss`.
`scale_and_bias` exposes the model's own t = exp(t') and b, saved in `model.safetensors` and used by
`transformers.pipeline` exactly as trained.

NaFlex pixels travel as one packed tensor, (n, 1 + P, 3 p^2): row 0 of each image holds its patch grid (rows,
columns), rows 1 .. P its patches, padded to the patch budget P (`pack_patches`). Everything that slices or moves
pixel tensors along their first dimension (the loader, micro-batches, the image-feature cache, the ring's ranks)
therefore carries NaFlex batches of mixed sizes and aspect ratios unchanged; only `encode_images` unpacks them.

Padding, and why training and the zero-shot pipeline see the same text embedding:
the pipeline pads SigLIP text to 64 tokens, and the text tower pools the last position. Our tokenizers pad on
the LEFT (the end token `</s>` is always last) and our models mask pad keys (`text_config.mask_pad_tokens`,
which the pipeline does too, as the tokenizer returns an attention mask). With pad keys masked, a pad column
changes no other token's output, so only where the real tokens sit matters: `encode_texts` places an (n, L)
batch at the END of the 64-position table (positions 64 - L .. 63), where the pipeline's left-padded 64 tokens
put them, and skips the columns that are padding in every row. The result equals the pipeline's full 64-token
forward (tested) and costs only the longest caption of the batch.

Google's checkpoints (SigLIP v1 with its sentencepiece tokenizer, SigLIP 2 with a Gemma tokenizer) keep their own
convention: captions padded on the RIGHT to 64 tokens with no attention mask, so every position is attended to
and the last one (usually a pad) is pooled. `load_model` records which convention a checkpoint's tokenizer
follows, and `encode_texts` computes what transformers computes on what that tokenizer returns.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    Siglip2Config,
    Siglip2Model,
    Siglip2TextConfig,
    Siglip2VisionConfig,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from siglip.errors import UserError

PIPELINE_TEXT_LENGTH = 64
"""Tokens per caption that `pipeline("zero-shot-image-classification")` pads SigLIP text to (hard-coded there)."""

PAD_TOKEN_ID = 0
"""Id of `<pad>` in the tokenizers `siglip.tokenizer.train_tokenizer` makes."""

EOS_TOKEN_ID = 1
"""Id of `</s>`, the end token every caption ends with, in our tokenizers."""

MODEL_TYPES = {"siglip": SiglipModel, "siglip2": Siglip2Model}
"""config.json's model_type -> the transformers class a checkpoint is loaded as and exported in."""


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of both towers. The image embedding is the vision width; the text head projects to it."""

    description: str
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    patch_size: int
    image_size: int
    """Default square image side in pixels (`build_model(image_size=...)` overrides it). For NaFlex, the side of
    the square image whose patches fill the position grid: grid (image_size / patch_size)^2, and the default patch
    budget of the processor."""
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    naflex: bool = False
    """A SigLIP 2 NaFlex image tower (`Siglip2Model`): images keep their aspect ratio, resized to a patch budget."""


PRESETS: dict[str, ModelPreset] = {
    # About 1.8 M parameters with a ~1k vocabulary: learns the shapes world on 2 CPU cores in minutes.
    "tiny": ModelPreset(
        description="CPU demo and tests: width 128, 4 layers per tower, patch 8 on 32x32 images",
        vision_width=128, vision_layers=4, vision_heads=4, vision_mlp=512, patch_size=8, image_size=32,
        text_width=128, text_layers=4, text_heads=4, text_mlp=512,
    ),
    # big_vision's ViT-S/16 with a text tower of the same width.
    "small": ModelPreset(
        description="ViT-S/16 image tower (width 384, 12 layers), 12-layer text tower of width 384",
        vision_width=384, vision_layers=12, vision_heads=6, vision_mlp=1536, patch_size=16, image_size=224,
        text_width=384, text_layers=12, text_heads=6, text_mlp=1536,
    ),
    # The paper's B/16 (the shape of google/siglip-base-patch16-224).
    "base": ModelPreset(
        description="ViT-B/16 image tower (width 768, 12 layers), 12-layer text tower of width 768",
        vision_width=768, vision_layers=12, vision_heads=12, vision_mlp=3072, patch_size=16, image_size=224,
        text_width=768, text_layers=12, text_heads=12, text_mlp=3072,
    ),
    # The tiny towers with a NaFlex image tower: a 4 x 4 position grid, 16 patches of 8 px by default.
    "naflex-tiny": ModelPreset(
        description="SigLIP 2 NaFlex on the CPU: tiny's towers, patch 8, a budget of 16 patches (32x32 px)",
        vision_width=128, vision_layers=4, vision_heads=4, vision_mlp=512, patch_size=8, image_size=32,
        text_width=128, text_layers=4, text_heads=4, text_mlp=512, naflex=True,
    ),
    # The shape of google/siglip2-base-patch16-naflex: B/16, a 16 x 16 position grid, 256 patches by default.
    "naflex-base": ModelPreset(
        description="SigLIP 2 NaFlex B/16 (width 768, 12 layers per tower), a budget of 256 patches",
        vision_width=768, vision_layers=12, vision_heads=12, vision_mlp=3072, patch_size=16, image_size=256,
        text_width=768, text_layers=12, text_heads=12, text_mlp=3072, naflex=True,
    ),
}


def check_text_length(max_text_length: int) -> None:
    """Refuse a caption length the exported model cannot reproduce: the zero-shot pipeline pads SigLIP text to
    64 tokens, so a caption trained at more positions would be placed elsewhere by transformers."""
    if not 2 <= max_text_length <= PIPELINE_TEXT_LENGTH:
        raise UserError(
            f"max text length {max_text_length} is not supported: captions take 2 to {PIPELINE_TEXT_LENGTH} tokens "
            f"(transformers' zero-shot pipeline pads SigLIP text to {PIPELINE_TEXT_LENGTH}); use at most "
            f"--max-text-length {PIPELINE_TEXT_LENGTH}"
        )


def build_model(
    preset: str,
    *,
    vocab_size: int,
    max_text_length: int = PIPELINE_TEXT_LENGTH,
    image_size: int | None = None,
    init_logit_scale: float = 10.0,
    init_logit_bias: float = -10.0,
    pad_token_id: int = PAD_TOKEN_ID,
    eos_token_id: int = EOS_TOKEN_ID,
) -> SiglipModel | Siglip2Model:
    """A freshly initialised SigLIP of the named preset, with t' = log(init_logit_scale) and b = init_logit_bias.

    Args:
        preset: a key of `PRESETS` ("tiny", "small", "base", "naflex-tiny", "naflex-base").
        vocab_size: the tokenizer's size, `len(tokenizer)`.
        max_text_length: tokens per caption (the tokenizer's max_length), 2 to 64. The position table holds the
            64 positions the pipeline pads to.
        image_size: square image side in pixels; None takes the preset's. Must be a multiple of the patch size.
            For a NaFlex preset it sets the position grid, (image_size / patch_size)^2 entries.
        init_logit_scale: t itself (the paper's 10); the model stores t' = log t, as HF does.
        init_logit_bias: b (the paper's -10).
        pad_token_id, eos_token_id: the tokenizer's `<pad>` and end-token ids (ours: 0 and 1). Pad keys are masked.

    Returns:
        A `transformers.SiglipModel` (a `Siglip2Model` for NaFlex presets) in training mode, float32, on the CPU.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    image_size = spec.image_size if image_size is None else image_size
    if image_size < spec.patch_size or image_size % spec.patch_size:
        raise UserError(
            f"image_size {image_size} does not fit preset {preset!r}: "
            f"use a multiple of its patch size {spec.patch_size}"
        )
    if vocab_size < 2:
        raise UserError(f"vocab_size must be at least 2, got {vocab_size}; pass len(tokenizer)")
    if not math.isfinite(init_logit_scale) or init_logit_scale <= 0:
        raise UserError(f"init_logit_scale must be a positive number (t itself, e.g. 10), got {init_logit_scale}")
    check_text_length(max_text_length)
    text = dict(
        vocab_size=vocab_size, hidden_size=spec.text_width, intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        max_position_embeddings=PIPELINE_TEXT_LENGTH, projection_size=spec.vision_width,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
    )
    vision = dict(hidden_size=spec.vision_width, intermediate_size=spec.vision_mlp,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  patch_size=spec.patch_size)
    if spec.naflex:
        model: SiglipModel | Siglip2Model = Siglip2Model(Siglip2Config(
            text_config=Siglip2TextConfig(**text),
            vision_config=Siglip2VisionConfig(**vision, num_patches=(image_size // spec.patch_size) ** 2)))
    else:
        model = SiglipModel(SiglipConfig(text_config=SiglipTextConfig(**text),
                                         vision_config=SiglipVisionConfig(**vision, image_size=image_size)))
    # Not a transformers field: saved in config.json, it tells encode_texts (and readers) that pad keys are
    # masked, which is what the pipeline does too since our tokenizer returns an attention mask.
    model.config.text_config.mask_pad_tokens = True
    # transformers initialises both at 0 (t = 1, b = 0); the paper starts at t' = log 10, b = -10.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(init_logit_scale))
        model.logit_bias.fill_(init_logit_bias)
    return model.train()


def is_naflex(model: torch.nn.Module) -> bool:
    """Whether the model's image tower is SigLIP 2 NaFlex (takes packed patches, see `pack_patches`)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "siglip2"


def model_image_size(model: torch.nn.Module) -> int:
    """The model's image side in pixels: its fixed resolution, or for NaFlex the side of the square image whose
    patches fill its position grid (what the built-in worlds are drawn at for it)."""
    vision = model.config.vision_config
    if is_naflex(model):
        return int(vision.patch_size) * math.isqrt(int(vision.num_patches))
    return int(vision.image_size)


def pack_patches(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """One image's NaFlex patches (P, C), padded to the budget P, and its patch grid (rows, columns) ->
    (1 + P, C) float32: row 0 holds the grid, rows 1 .. P the patches (the padding after rows * columns)."""
    rows, columns = grid
    if patches.dim() != 2 or patches.shape[1] < 2 or not 1 <= rows * columns <= patches.shape[0]:
        raise ValueError(f"patches must be (P, C) with rows * columns <= P, got {tuple(patches.shape)}, grid {grid}")
    header = patches.new_zeros(1, patches.shape[1], dtype=torch.float32)
    header[0, :2] = torch.tensor([rows, columns], dtype=torch.float32)     # exact: integers below 2^24
    return torch.cat([header, patches.float()])


def unpack_patches(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 1 + P, C) packed NaFlex pixels -> what `Siglip2Model` takes: pixel_values (n, P', C), pixel_attention_mask
    (n, P') int32 and spatial_shapes (n, 2) int64, with P' the most patches any image of the batch uses (columns
    of padding in every row are dropped: they are masked, so the result is the same)."""
    if packed.dim() != 3 or packed.shape[1] < 2:
        raise ValueError(f"NaFlex pixels must be packed (n, 1 + P, 3 p^2) (siglip.model.pack_patches), got shape "
                         f"{tuple(packed.shape)}")
    spatial_shapes = packed[:, 0, :2].round().long()                           # (n, 2) patch rows, columns
    used = spatial_shapes.prod(dim=1)                                          # (n,) real patches per image
    width = int(used.max()) if len(used) else 0
    positions = torch.arange(width, device=packed.device)
    mask = (positions[None, :] < used[:, None]).to(torch.int32)               # the processor's int32 mask
    return packed[:, 1:1 + width], mask, spatial_shapes


def encode_images(model: SiglipModel | Siglip2Model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S) float pixel values (as the processor makes them), or for NaFlex (n, 1 + P, 3 p^2) packed
    patches (`pack_patches`) -> (n, d) L2-normalised image embeddings."""
    if is_naflex(model):
        patches, mask, spatial_shapes = unpack_patches(pixel_values)
        output = model.get_image_features(pixel_values=patches, pixel_attention_mask=mask,
                                          spatial_shapes=spatial_shapes)
    else:
        output = model.get_image_features(pixel_values=pixel_values)
    return F.normalize(_pooled(output), dim=-1)                                # (n, d) attention-pooled


def encode_texts(model: SiglipModel | Siglip2Model, input_ids: torch.Tensor) -> torch.Tensor:
    """(n, L) int64 token ids padded to the tokenizer's full length -> (n, d) L2-normalised text embeddings.

    For models that mask pad keys (ours, and foreign ones whose tokenizer returns an attention mask and pads on
    the left) the ids sit at the last L positions and pads are masked: the result equals HF's forward on the same
    captions left-padded to the full position table, as the zero-shot pipeline feeds them. Leading all-pad columns
    are skipped. A right-padding tokenizer that returns a mask gets HF's forward with that mask; one that returns
    none (Google's SigLIP and SigLIP 2, which attend to their pads) gets HF's plain forward.
    """
    text_config = model.config.text_config
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (n, L) token ids, got shape {tuple(input_ids.shape)}")
    if not getattr(text_config, "mask_pad_tokens", False) or text_config.pad_token_id is None:
        return F.normalize(_pooled(model.get_text_features(input_ids=input_ids)), dim=-1)
    is_token = input_ids != text_config.pad_token_id                       # (n, L) keys that take part
    if getattr(text_config, "padding_side", "left") == "right":
        features = model.get_text_features(input_ids=input_ids, attention_mask=is_token.long())
        return F.normalize(_pooled(features), dim=-1)
    length, positions = input_ids.shape[1], text_config.max_position_embeddings
    if length > positions:
        raise ValueError(f"input_ids has {length} tokens a row, more than the model's {positions} text positions")
    # The first column holding a real token in any row; the last column always stays (it is pooled).
    used_columns = is_token.any(dim=0).nonzero()
    start = min(int(used_columns[0]) if len(used_columns) else length - 1, length - 1)
    # Column c of the (n, L) batch is position P - L + c: right-aligned, as after the pipeline's left padding.
    position_ids = torch.arange(positions - length + start, positions, device=input_ids.device).unsqueeze(0)
    features = model.get_text_features(
        input_ids=input_ids[:, start:], attention_mask=is_token[:, start:].long(), position_ids=position_ids
    )
    return F.normalize(_pooled(features), dim=-1)


def scale_and_bias(model: SiglipModel | Siglip2Model) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, b) as 0-d tensors carrying gradients to the model's t' and b: t = exp(t'), the temperature itself."""
    return model.logit_scale.exp().reshape(()), model.logit_bias.reshape(())


def record_tokenizer_conventions(model: SiglipModel | Siglip2Model, tokenizer) -> None:
    """Write the tokenizer's special-token ids into the text config (transformers' defaults, 49406 and 49407,
    lie outside most vocabularies), and for a checkpoint not made here, how its captions are padded.

    A checkpoint written by siglip (text_config.mask_pad_tokens present) keeps its recorded convention. Any other
    masks pad keys exactly when its tokenizer hands the pipeline an attention mask, on the side it pads.
    """
    text_config = model.config.text_config
    text_config.pad_token_id = tokenizer.pad_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    text_config.bos_token_id = tokenizer.bos_token_id
    if hasattr(text_config, "mask_pad_tokens"):
        return
    masked = "attention_mask" in tokenizer.model_input_names and tokenizer.pad_token_id is not None
    if masked and tokenizer.pad_token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        raise UserError(
            f"the tokenizer pads with its {tokenizer.pad_token!r} token, which also marks a caption's start or end, "
            "and returns an attention mask: its masks cannot be rebuilt from token ids; set \"model_input_names\": "
            "[\"input_ids\"] in tokenizer_config.json (no mask, as Google's SigLIP) or give it a separate pad token"
        )
    text_config.mask_pad_tokens = masked
    if masked and tokenizer.padding_side == "right":
        text_config.padding_side = "right"


def load_model(directory: str) -> tuple[SiglipModel | Siglip2Model, object]:
    """A SigLIP model and its processor from a train DIR (uses DIR/final), a DIR/final, or a HF checkpoint.

    Accepts a local directory holding a `config.json` of model_type "siglip" (SigLIP v1 with a sentencepiece
    tokenizer, fixed-resolution SigLIP 2 with a Gemma tokenizer.json, and ours) or "siglip2" (SigLIP 2 NaFlex),
    `model.safetensors` (or its sharded index) and the processor files; the checkpoint's tokenizer, image size or
    patch budget, and normalisation come with it. Weights are read from safetensors only: a pickle is never
    opened. Anything else raises `UserError` saying what was found. The model is returned in eval mode.
    """
    from transformers.utils import logging as hf_logging

    directory = resolve_model_dir(directory)
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config_dict = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {config_path}: {error}; is {directory!r} a model directory?") from error
    model_type = config_dict.get("model_type")
    architectures = ", ".join(config_dict.get("architectures") or []) or "none named"
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"{config_path} describes a {model_type!r} model (architectures {architectures}), not a SigLIP "
            "(model_type 'siglip' or 'siglip2'); pass a directory written by `siglip train` or a Hugging Face "
            "SigLIP or SigLIP 2 checkpoint"
        )
    files = sorted(os.listdir(directory))
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        pickles = [name for name in files if name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else f"no weights (files: {', '.join(files)})"
        raise UserError(
            f"{directory!r} has {found}; siglip loads model.safetensors only and never unpickles: convert the "
            "checkpoint to safetensors (save_pretrained(..., safe_serialization=True)) where you trust it"
        )
    # transformers' loading-report bar is noise on a CLI, and printing any SiglipConfig makes it build a default
    # text config whose own ids (49406, 49407) lie outside its vocabulary, which it warns about: both muted.
    previous_verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = _load_weights(MODEL_TYPES[model_type], directory)
        processor = _load_processor(directory)
    finally:
        hf_logging.set_verbosity(previous_verbosity)
    record_tokenizer_conventions(model, processor.tokenizer)
    return model, processor


def _load_weights(model_class: type, directory: str) -> SiglipModel | Siglip2Model:
    name = model_class.__name__
    try:
        model, info = model_class.from_pretrained(directory, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        raise UserError(f"cannot load the {name} weights in {directory!r}: {error}") from error
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(entry[0]) if isinstance(entry, tuple) else str(entry)
                  for entry in info.get("mismatched_keys") or []]
    if missing or mismatched:
        shown = ", ".join((missing + mismatched)[:5])
        raise UserError(
            f"model.safetensors in {directory!r} does not fit its {name} config.json: {len(missing)} missing and "
            f"{len(mismatched)} mismatched tensors (e.g. {shown}); is it another architecture's weights?"
        )
    return model.eval()


def _load_processor(directory: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(directory)
    except ImportError as error:
        raise UserError(f"the tokenizer in {directory!r} needs a package that is missing ({_first_line(error)}); "
                        "install the project's dependencies: pip install sentencepiece protobuf") from None
    except Exception as error:   # sentencepiece, protobuf and tokenizers each raise their own types
        raise UserError(
            f"cannot load the processor (tokenizer and image processor files) in {directory!r}: "
            f"{type(error).__name__}: {_first_line(error)}; the tokenizer files (spiece.model, tokenizer.json, "
            "tokenizer_config.json) may be damaged or missing: copy them again from the checkpoint's source"
        ) from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise UserError(
            f"{directory!r} holds a {type(processor).__name__}, not a processor with a tokenizer and an image "
            "processor; save a SiglipProcessor beside the model (processor.save_pretrained)"
        )
    return processor


def resolve_model_dir(directory: str) -> str:
    """DIR itself when it holds config.json, else DIR/final (a `siglip train` output); UserError if neither."""
    if not os.path.isdir(directory):
        raise UserError(f"model directory {directory!r} does not exist; pass a `siglip train --out` DIR or DIR/final")
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    final = os.path.join(directory, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    found = ", ".join(sorted(os.listdir(directory))[:10]) or "nothing"
    raise UserError(
        f"{directory!r} holds no config.json and no final/config.json (found: {found}); pass a directory written "
        "by `siglip train` (or its final/), or a Hugging Face SigLIP checkpoint directory"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features, 4.x a tensor: the pooled (n, d) either way."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
