"""One image-caption pair, the ways reading one can fail, and the checks every file source shares.

Every source (procedural or read from files) yields `Sample`s. Reading a sample from a file can fail in many
ways that say nothing about the run as a whole (a truncated JPEG, an empty caption): such a failure raises
`BadSample` with a short `kind`, so the loader can skip it, count it by kind, and log it with its key.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from siglip.errors import UserError

logger = logging.getLogger("siglip.data")

DEFAULT_MAX_IMAGE_PIXELS = 64 * 2**20
"""Images with more pixels than this (64 Mpx, about 8k x 8k) are refused before decoding: decompression bombs."""


@dataclass(eq=False)
class Region:
    """One object of an image: where it is, the words that pick it out, and what it is."""

    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) in pixels of the sample's image, x rightwards and y downwards, continuous coordinates
    (pixel (i, j) spans [i, i + 1) x [j, j + 1)): the smallest pixel-aligned box holding every pixel the object
    touches."""
    phrase: str
    """A referring expression: words that single the object out among the image's objects ("the red circle")."""
    labels: dict[str, int]
    """Task -> class index of this object, in the source's `tasks` order (shapes: color, shape)."""
    coverage: np.ndarray
    """(H, W) float32 in [0, 1]: the fraction of each pixel of the image the object covers (0 outside it)."""


@dataclass
class Sample:
    """One image with its caption, as every source yields it."""

    image: Image.Image
    """RGB image (any size; the processor resizes)."""
    caption: str
    """Non-empty caption, stripped of surrounding whitespace."""
    key: str
    """Unique name of the sample, shown in logs and errors (e.g. "shapes/train/123", "data.csv:17")."""
    labels: dict[str, int] = field(default_factory=dict)
    """Zero-shot task name -> class index. A task may be missing from a sample (in `shapes` only single-object
    images carry `color` and `shape`): a sample counts for exactly the tasks it names. Empty without labels."""
    positive_id: int = 0
    """Pairs with equal ids are positives of each other: the class id for labelled samples, otherwise a stable
    63-bit hash of the normalised caption (see `caption_id`)."""
    regions: list[Region] | None = None
    """Where the image's objects are, for sources that know (shapes, when opened with with_regions=True); None
    otherwise. Read by the SigLIP 2 recipe (siglip.siglip2): box tokens for its decoder, per-patch labels."""


class BadSample(UserError):
    """A sample that cannot be read: skipped and counted by the loader, raised under `strict`.

    A subclass of `UserError`, so a strict run that meets one ends with its key on one line and exit status 2.
    """

    def __init__(self, kind: str, key: str, detail: str = ""):
        # The arguments go to Exception as they are, so the error pickles (it crosses DataLoader workers).
        super().__init__(kind, key, detail)
        self.kind = kind
        self.key = key
        self.detail = detail

    def describe(self) -> str:
        """What is wrong, without advice: the line logged when the sample is skipped."""
        detail = f": {self.detail}" if self.detail else ""
        return f"bad sample {self.key} ({self.kind}){detail}"

    def __str__(self) -> str:
        # Raised only when a run stops at it (--strict): the advice names the way to skip it instead.
        return f"{self.describe()}; fix or remove it, or run without --strict to skip it"


class BadSampleLog:
    """Logs bad samples with their keys, rate-limited: the first `first` in full, then at 100, 1000, ... per kind."""

    def __init__(self, first: int = 10):
        self.first = first
        self.counts: Counter[str] = Counter()

    def record(self, error: BadSample) -> None:
        self.counts[error.kind] += 1
        count, total = self.counts[error.kind], sum(self.counts.values())
        if total <= self.first:
            logger.warning("skipping %s", error.describe())
        elif count >= 100 and str(count).rstrip("0") == "1":
            logger.warning("skipped %d samples of kind %s so far (latest: %s)", count, error.kind, error.key)


_WORD = re.compile(r"[^\w]+")


def caption_id(caption: str) -> int:
    """A stable 63-bit id of a caption, equal for captions that differ only in case, punctuation and spacing."""
    normalised = " ".join(_WORD.sub(" ", caption.lower()).split())
    digest = hashlib.blake2b(normalised.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_caption(text: str | bytes | None, key: str) -> str:
    """The caption stripped of surrounding whitespace; BadSample if it is missing, empty or not UTF-8.

    Text read with errors="surrogateescape" carries undecodable bytes as lone surrogates: those count as not UTF-8.
    """
    if text is None:
        raise BadSample("missing_caption", key, "the sample has no caption")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSample("not_utf8", key, f"caption bytes are not UTF-8 ({error.reason} at {error.start})") from None
    if not isinstance(text, str):
        raise BadSample("malformed_record", key, f"caption must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadSample("not_utf8", key, "caption holds bytes that are not UTF-8") from None
    text = text.strip()
    if not text:
        raise BadSample("empty_caption", key, "the caption is empty or only whitespace")
    return text


def decode_image(data: bytes | None, key: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) into an RGB image, or raise BadSample saying why not.

    Modes that carry colour are converted: CMYK and YCbCr through PIL, 16-bit and 32-bit grey by scaling to
    8 bits, transparency (RGBA, LA, palette with a transparent colour) by compositing onto white.
    `draft_size`, when given, lets a JPEG decode at a reduced scale no smaller than draft_size x draft_size.
    """
    if data is None:
        raise BadSample("missing_image", key, "the sample has no image")
    if len(data) == 0:
        raise BadSample("empty_image", key, "the image file has zero bytes")
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; PIL's global one only warns up to twice its value.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadSample("too_many_pixels", key, str(error)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        kind = "truncated_image" if "truncat" in str(error).lower() else "undecodable_image"
        raise BadSample(kind, key, f"not a readable image ({error})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample("too_many_pixels", key, f"{width} x {height} pixels, over the limit of {max_pixels}")
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image, key)
    except BadSample:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        kind = "truncated_image" if "truncat" in str(error).lower() else "undecodable_image"
        raise BadSample(kind, key, str(error)) from None


def to_rgb(image: Image.Image, key: str) -> Image.Image:
    """An RGB version of a decoded image of any common mode; BadSample("unsupported_mode") otherwise."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit and 32-bit grey: PIL's own conversion clips at 255, which turns most such images white.
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0.0)
        if mode.startswith("I;16") or peak > 255:
            full_scale = 65535.0
        elif mode == "F" and peak <= 1.0:
            full_scale = 1.0
        else:
            full_scale = 255.0
        grey = np.clip(values * (255.0 / full_scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return image.convert("RGB")
    raise BadSample("unsupported_mode", key, f"image mode {mode!r} cannot be converted to RGB")
