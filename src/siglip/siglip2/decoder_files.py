"""The trained decoder on disk, beside a run's final/ model: DIR/decoder/ holds decoder.json (its sizes, its
vocabulary, and the text length its phrases were cut to) and model.safetensors (its weights). final/ stays a plain
transformers SigLIP model; the decoder is what `siglip eval --task dense` reads for referring-expression accuracy.

Written like final/: into a temporary directory beside the target, then renamed into place, so a reader finds a
whole decoder or none.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from siglip.errors import UserError
from siglip.siglip2.boxes import DecoderVocabulary
from siglip.siglip2.decoder import DecoderConfig, LocCaDecoder

DECODER_DIRECTORY = "decoder"
"""Its name beside final/ in a run directory."""
CONFIG_FILE, WEIGHTS_FILE = "decoder.json", "model.safetensors"
FORMAT = "siglip-locca-decoder/1"


@dataclass
class SavedDecoder:
    """A decoder read back: the module (float32, eval mode, CPU), its vocabulary, and the text length (tokens,
    </s> included) its captions and phrases were cut to in training (`boxes.TextEncoder`)."""

    decoder: LocCaDecoder
    vocab: DecoderVocabulary
    text_length: int


def save_decoder(decoder: LocCaDecoder, vocab: DecoderVocabulary, text_length: int,
                 directory: str | os.PathLike) -> Path:
    """Write the decoder's weights (float32, on the CPU), its config, vocabulary and text length into `directory`."""
    directory = Path(directory)
    temporary = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    weights = {name: value.detach().to("cpu", torch.float32, copy=True).contiguous()
               for name, value in decoder.state_dict().items()}
    save_file(weights, str(temporary / WEIGHTS_FILE))
    document = {"format": FORMAT, "decoder": decoder.config.asdict(),
                "vocabulary": {"text_size": vocab.text_size, "bins": vocab.bins, "pad_id": vocab.pad_id,
                               "eos_id": vocab.eos_id}, "text_length": int(text_length)}
    (temporary / CONFIG_FILE).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(temporary, directory)
    return directory


def load_decoder(directory: str | os.PathLike) -> SavedDecoder:
    """The decoder saved by `save_decoder`."""
    directory = Path(directory)
    try:
        document = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {FORMAT!r}")
        decoder = LocCaDecoder(DecoderConfig(**document["decoder"]))
        vocab = DecoderVocabulary(**document["vocabulary"])
        text_length = int(document["text_length"])
        decoder.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"{directory} is not a decoder written by siglip train ({reason}); train one with "
                        "--decoder-weight 1, or evaluate without it") from None
    return SavedDecoder(decoder.eval(), vocab, text_length)


def find_decoder(model_dir: str | os.PathLike) -> Path | None:
    """The decoder of a model directory: MODEL_DIR/decoder for a `siglip train --out` DIR, or the decoder beside
    it when MODEL_DIR is that DIR's final/; None when there is none (a run without --decoder-weight, a Google
    checkpoint)."""
    model_dir = Path(model_dir)
    candidates = [model_dir / DECODER_DIRECTORY]
    if model_dir.name == "final":
        candidates.append(model_dir.parent / DECODER_DIRECTORY)
    for candidate in candidates:
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None
