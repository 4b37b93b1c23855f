"""The image-feature cache of SigLiT (`siglip train --lock-image --cache-image-features`).

With the image tower locked (LiT, Zhai et al., 2022; SigLiT in the SigLIP paper, Section 3), an image's embedding
is the same at every step: the tower's weights never change, it runs in eval mode (no dropout), and training
applies no random augmentation (`siglip.train.step.PairTransform.augments_images`). So each image is embedded once, on
the first batch that holds it, and looked up by its sample key (`Sample.key`) whenever it comes back; from the
second epoch on only the text tower runs.

What is stored is exactly what the loss path receives from the tower: the L2-normalised embedding of
`siglip.model.encode_images`, as float32 (an embedding computed under bfloat16 autocast is stored as its float32
value, which is what `contrastive_loss` would convert it to). Rows live in one CPU tensor, preallocated for the
most distinct images the run can meet, so the cost is n_images x d x 4 bytes plus a dict entry per key.

The cache is per process: under torchrun each rank caches the images of its own slices of the batches (over
several epochs a rank meets other images too, up to the whole source). It is not checkpointed: a resumed run
rebuilds it, at the price of embedding each image once more.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from siglip.errors import UserError


class ImageFeatureCache:
    """Sample key -> (d,) float32 embedding of a frozen image tower, kept on the CPU.

    Args:
        capacity: the most distinct keys the cache will hold (e.g. min(source size, steps x local batch)). Storage
            for them is reserved on the first insertion, after checking that it fits in the available memory.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be a positive number of images, got {capacity}")
        self.capacity = capacity
        self.slots: dict[str, int] = {}
        self.storage: torch.Tensor | None = None       # (capacity, d) float32, allocated at the first insertion
        self.looked_up = 0
        """Rows served from the cache without running the tower."""

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def encoded(self) -> int:
        """Images embedded so far: one per distinct key."""
        return len(self.slots)

    def features(self, keys: list[str], pixel_values: torch.Tensor,
                 encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(n, d) float32 CPU embeddings of the n samples named by `keys`, embedding only those never seen.

        Args:
            keys: n sample keys, one per row of pixel_values (a key may repeat within a batch).
            pixel_values: (n, 3, S, S) the batch's images; only the rows of unseen keys are read.
            encode: (m, 3, S, S) float32 CPU pixels -> (m, d) L2-normalised embeddings (any device and float dtype);
                called at most once per call, with the first row of each unseen key.
        """
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"keys must name the {pixel_values.shape[0]} rows of pixel_values, got {len(keys)} keys")
        first_rows: dict[str, int] = {}
        for row, key in enumerate(keys):
            if key not in self.slots and key not in first_rows:
                first_rows[key] = row
        if first_rows:
            new = encode(pixel_values[list(first_rows.values())]).detach().float().cpu()    # (m, d)
            self._insert(list(first_rows), new)
        self.looked_up += len(keys) - len(first_rows)
        rows = torch.tensor([self.slots[key] for key in keys], dtype=torch.long)
        return self.storage.index_select(0, rows)                                       # (n, d)

    def _insert(self, keys: list[str], features: torch.Tensor) -> None:
        if self.storage is None:
            self.storage = _reserve(self.capacity, features.shape[1])
        start = len(self.slots)
        if start + len(keys) > self.storage.shape[0]:
            # More distinct keys than the capacity promised (a source whose keys are not unique per image would
            # not get here; a miscounted capacity would): grow rather than fail.
            grown = torch.empty(max(2 * self.storage.shape[0], start + len(keys)), self.storage.shape[1])
            grown[:start] = self.storage[:start]
            self.storage = grown
        self.storage[start:start + len(keys)] = features
        self.slots.update((key, start + offset) for offset, key in enumerate(keys))


def _reserve(capacity: int, dim: int) -> torch.Tensor:
    """(capacity, dim) float32 storage; a clear error when it cannot fit in the memory available now."""
    need = capacity * dim * 4
    available = available_memory_bytes()
    if available is not None and need > available:
        raise UserError(
            f"--cache-image-features needs {need / 2**30:.1f} GiB for up to {capacity} images x {dim} float32 "
            f"values, but only {available / 2**30:.1f} GiB of memory is available; train without the cache, "
            "or for fewer steps"
        )
    return torch.empty(capacity, dim)


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
