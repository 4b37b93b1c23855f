"""The two towers: Hugging Face `SiglipModel` presets, SigLIP's t' and b init, and loading checkpoints.

A model here is a plain `transformers.SiglipModel`: a ViT image tower whose attention-pooling head gives one
embedding per image, and a text transformer that pools its LAST token (Zhai et al., 2023, sec. 2; the HF port
keeps big_vision's pooling). The loss is not the model's: training calls `encode_images` / `encode_texts` and
hands the embeddings to `siglip.loss`. `scale_and_bias` exposes the model's own t = exp(t') and b so that they
are saved in `model.safetensors` and used by `transformers.pipeline` exactly as trained.

Padding, and why training and the zero-shot pipeline see the same text embedding:
the pipeline pads SigLIP text to 64 tokens, and the text tower pools the last position. Our tokenizers pad on
the LEFT (the end token `</s>` is always last) and our models mask pad keys (`text_config.mask_pad_tokens`,
which the pipeline does too, as the tokenizer returns an attention mask). With pad keys masked, a pad column
changes no other token's output, so only where the real tokens sit matters: `encode_texts` places an (n, L)
batch at the END of the position table (positions P - L .. P - 1, P = max(L, 64)), where the pipeline's
left-padded 64 tokens put them, and skips the columns that are padding in every row. The result equals the
pipeline's full 64-token forward (tested) and costs only the longest caption of the batch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import SiglipConfig, SiglipModel, SiglipProcessor, SiglipTextConfig, SiglipVisionConfig

from siglip.errors import UserError

PIPELINE_TEXT_LENGTH = 64
"""Tokens per caption that `pipeline("zero-shot-image-classification")` pads SigLIP text to (hard-coded there)."""

PAD_TOKEN_ID = 0
"""Id of `<pad>` in the tokenizers `siglip.tokenizer.train_tokenizer` makes."""

EOS_TOKEN_ID = 1
"""Id of `</s>`, the end token every caption ends with, in our tokenizers."""


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
    """Default square image side in pixels (`build_model(image_size=...)` overrides it)."""
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int


PRESETS: dict[str, ModelPreset] = {
    # About 1.8 M parameters with a ~1k vocabulary: learns the shapes world on 2 CPU cores in minutes (NOTES.md).
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
}


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
) -> SiglipModel:
    """A freshly initialised SigLIP of the named preset, with t' = log(init_logit_scale) and b = init_logit_bias.

    Args:
        preset: a key of `PRESETS` ("tiny", "small", "base").
        vocab_size: the tokenizer's size, `len(tokenizer)`.
        max_text_length: tokens per caption (the tokenizer's max_length). The position table holds
            max(max_text_length, 64) positions so that the pipeline's 64-token padding fits.
        image_size: square image side in pixels; None takes the preset's. Must be a multiple of the patch size.
        init_logit_scale: t itself (the paper's 10); the model stores t' = log t, as HF does.
        init_logit_bias: b (the paper's -10).
        pad_token_id, eos_token_id: the tokenizer's `<pad>` and end-token ids (ours: 0 and 1). Pad keys are masked.

    Returns:
        A `transformers.SiglipModel` in training mode, float32, on the CPU.
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
    if max_text_length < 1:
        raise UserError(f"max_text_length must be positive, got {max_text_length}; use {PIPELINE_TEXT_LENGTH}")
    text_config = SiglipTextConfig(
        vocab_size=vocab_size, hidden_size=spec.text_width, intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        max_position_embeddings=max(max_text_length, PIPELINE_TEXT_LENGTH), projection_size=spec.vision_width,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
    )
    # Not a transformers field: saved in config.json, it tells encode_texts (and readers) that pad keys are
    # masked, which is what the pipeline does too since our tokenizer returns an attention mask.
    text_config.mask_pad_tokens = True
    vision_config = SiglipVisionConfig(
        hidden_size=spec.vision_width, intermediate_size=spec.vision_mlp, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=image_size, patch_size=spec.patch_size,
    )
    model = SiglipModel(SiglipConfig(text_config=text_config, vision_config=vision_config))
    # transformers initialises both at 0 (t = 1, b = 0); the paper starts at t' = log 10, b = -10.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(init_logit_scale))
        model.logit_bias.fill_(init_logit_bias)
    return model.train()


def encode_images(model: SiglipModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S) float pixel values (as the processor makes them) -> (n, d) L2-normalised image embeddings."""
    pooled = _pooled(model.get_image_features(pixel_values=pixel_values))   # (n, d) attention-pooled
    return F.normalize(pooled, dim=-1)


def encode_texts(model: SiglipModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(n, L) int64 token ids padded to the tokenizer's full length -> (n, d) L2-normalised text embeddings.

    For models that mask pad keys (ours, and foreign ones whose tokenizer returns an attention mask) the ids sit
    at the last L positions and pads are masked: the result equals HF's forward on the same captions left-padded
    to the full position table, as the zero-shot pipeline feeds them. Leading all-pad columns are skipped.
    Other models (e.g. Google's SigLIP, which attends to its pads) get HF's plain forward.
    """
    text_config = model.config.text_config
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (n, L) token ids, got shape {tuple(input_ids.shape)}")
    if not getattr(text_config, "mask_pad_tokens", False) or text_config.pad_token_id is None:
        return F.normalize(_pooled(model.get_text_features(input_ids=input_ids)), dim=-1)
    length, positions = input_ids.shape[1], text_config.max_position_embeddings
    if length > positions:
        raise ValueError(f"input_ids has {length} tokens a row, more than the model's {positions} text positions")
    is_token = input_ids != text_config.pad_token_id                       # (n, L) keys that take part
    # The first column holding a real token in any row; the last column always stays (it is pooled).
    used_columns = is_token.any(dim=0).nonzero()
    start = min(int(used_columns[0]) if len(used_columns) else length - 1, length - 1)
    # Column c of the (n, L) batch is position P - L + c: right-aligned, as after the pipeline's left padding.
    position_ids = torch.arange(positions - length + start, positions, device=input_ids.device).unsqueeze(0)
    features = model.get_text_features(
        input_ids=input_ids[:, start:], attention_mask=is_token[:, start:].long(), position_ids=position_ids
    )
    return F.normalize(_pooled(features), dim=-1)


def scale_and_bias(model: SiglipModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, b) as 0-d tensors carrying gradients to the model's t' and b: t = exp(t'), the temperature itself."""
    return model.logit_scale.exp().reshape(()), model.logit_bias.reshape(())


def load_model(directory: str) -> tuple[SiglipModel, SiglipProcessor]:
    """A SigLIP model and its processor from a train DIR (uses DIR/final), a DIR/final, or a HF SigLIP checkpoint.

    Accepts any local directory holding a `config.json` of model_type "siglip" (SigLIP, and the fixed-resolution
    SigLIP 2 checkpoints), `model.safetensors` (or its sharded index) and the processor files; the checkpoint's
    tokenizer, image size and normalisation come with it. Weights are read from safetensors only: a pickle is
    never opened. Anything else raises `UserError` saying what was found. The model is returned in eval mode.
    """
    from transformers import AutoProcessor
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
    if model_type == "siglip2":
        raise UserError(
            f"{directory!r} holds a SigLIP 2 NaFlex model (model_type 'siglip2', architectures {architectures}); "
            "siglip trains fixed-resolution towers: use a fixed-resolution SigLIP 2 checkpoint (model_type 'siglip')"
        )
    if model_type != "siglip":
        raise UserError(
            f"{config_path} describes a {model_type!r} model (architectures {architectures}), not a SigLIP "
            "(model_type 'siglip'); pass a directory written by `siglip train` or a Hugging Face SigLIP checkpoint"
        )
    files = sorted(os.listdir(directory))
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        pickles = [name for name in files if name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else f"no weights (files: {', '.join(files)})"
        raise UserError(
            f"{directory!r} has {found}; siglip loads model.safetensors only and never unpickles: convert the "
            "checkpoint to safetensors (save_pretrained(..., safe_serialization=True)) where you trust it"
        )
    # The loading-report progress bar is noise on a CLI; missing or unexpected keys are checked just below.
    previous_verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = SiglipModel.from_pretrained(directory, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"cannot load the SigLIP weights in {directory!r}: {error}") from error
    finally:
        hf_logging.set_verbosity(previous_verbosity)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(entry[0]) if isinstance(entry, tuple) else str(entry)
                  for entry in info.get("mismatched_keys") or []]
    if missing or mismatched:
        shown = ", ".join((missing + mismatched)[:5])
        raise UserError(
            f"model.safetensors in {directory!r} does not fit its SigLIP config.json: {len(missing)} missing and "
            f"{len(mismatched)} mismatched tensors (e.g. {shown}); is it another architecture's weights?"
        )
    try:
        processor = AutoProcessor.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UserError(
            f"cannot load the processor (tokenizer and image processor files) in {directory!r}: {error}"
        ) from error
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise UserError(
            f"{directory!r} holds a {type(processor).__name__}, not a processor with a tokenizer and an image "
            "processor; save a SiglipProcessor beside the model (processor.save_pretrained)"
        )
    if not hasattr(model.config.text_config, "mask_pad_tokens"):
        # A foreign checkpoint: mask pads exactly when its tokenizer hands the pipeline an attention mask.
        model.config.text_config.mask_pad_tokens = "attention_mask" in processor.tokenizer.model_input_names
        if processor.tokenizer.pad_token_id is not None:   # the mask encode_texts derives must be the tokenizer's
            model.config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


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


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features, 4.x a tensor: the pooled (n, d) either way."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
