"""Embedding what evaluation reads: images a batch at a time as they arrive, texts, and prompt-ensembled classes."""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL.Image import Image
    from transformers import SiglipModel

logger = logging.getLogger("siglip.evaluate")


class ImageEmbedder:
    """Embeds images as they arrive, `batch_size` at a time, keeping only their (k, d) embeddings.

    An image the processor refuses (a NaFlex image below one patch) is left out and counted by kind in `skipped`,
    or raised when `strict`.
    """

    def __init__(self, model: SiglipModel, processor: Any, batch_size: int, device: str, skipped: Counter[str],
                 progress: bool = False, strict: bool = False):
        from tqdm.auto import tqdm

        from siglip.tokenizer import image_transform

        self.model, self.batch_size, self.device, self.skipped = model, batch_size, device, skipped
        self.strict = strict
        self.to_pixels = image_transform(processor)
        self.pending: list[torch.Tensor] = []
        self.chunks: list[torch.Tensor] = []
        self.count = 0
        """Images accepted so far (embedded or pending)."""
        self.bar = tqdm(desc="images", unit="image", disable=not progress, leave=False)

    def add(self, image: Image, key: str = "") -> bool:
        """Queue one PIL image; False (and counted) if the processor refuses it."""
        from siglip.tokenizer import ImageTooSmall

        try:
            self.pending.append(self.to_pixels(image))
        except ImageTooSmall as error:
            if self.strict:
                raise
            logger.warning("skipping %s: %s", key or "an image", error)
            self.skipped[error.kind] += 1
            return False
        self.count += 1
        if len(self.pending) == self.batch_size:
            self._flush()
        return True

    def features(self) -> torch.Tensor:
        """(k, d) float32 L2-normalised embeddings of the accepted images, in order, on the CPU."""
        self._flush()
        self.bar.close()
        width = self.model.config.vision_config.hidden_size
        return torch.cat(self.chunks) if self.chunks else torch.zeros(0, width)

    def _flush(self) -> None:
        from siglip.model import encode_images

        if self.pending:
            pixel_values = torch.stack(self.pending).to(self.device)
            self.chunks.append(encode_images(self.model, pixel_values).float().cpu())
            self.bar.update(len(self.pending))
            self.pending = []


def embed_images(model: SiglipModel, processor: Any, images: list[Image], batch_size: int,
                 device: str = "cpu") -> torch.Tensor:
    """PIL images -> (n, d) float32 L2-normalised embeddings, `batch_size` at a time, through the processor.
    Every image must be usable (a NaFlex image below one patch raises `siglip.tokenizer.ImageTooSmall`)."""
    embedder = ImageEmbedder(model, processor, batch_size, device, Counter(), strict=True)
    for image in images:
        embedder.add(image)
    return embedder.features()


def embed_texts(model: SiglipModel, processor: Any, texts: list[str], batch_size: int, device: str = "cpu", *,
                progress: bool = False) -> torch.Tensor:
    """Strings -> (n, d) float32 L2-normalised embeddings, tokenised exactly as in training."""
    from tqdm.auto import tqdm

    from siglip.model import encode_texts
    from siglip.tokenizer import tokenize

    chunks = []
    with tqdm(total=len(texts), desc="texts", unit="text", disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            input_ids = tokenize(processor, texts[start:start + batch_size])
            chunks.append(encode_texts(model, input_ids.to(device)).float().cpu())
            bar.update(len(input_ids))
    return torch.cat(chunks)


def class_embeddings(model: SiglipModel, processor: Any, classes: list[str], templates: list[str],
                     batch_size: int, device: str = "cpu") -> torch.Tensor:
    """(k, d) class embeddings: each class written into every template, embedded, averaged, re-normalised."""
    prompts = [template.replace("{}", name) for name in classes for template in templates]
    features = embed_texts(model, processor, prompts, batch_size, device)     # (k * T, d), class-major
    averaged = features.reshape(len(classes), len(templates), -1).mean(dim=1)
    return F.normalize(averaged, dim=-1)
