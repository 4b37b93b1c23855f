"""Files built on the fly for the data tests: random images, bad images of every kind, shards and a transform."""

from __future__ import annotations

import io
import random
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def random_image(side: int = 24, mode: str = "RGB") -> Image.Image:
    """An image of fresh random pixels."""
    pixels = np.random.default_rng(random.randrange(2**32)).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height pixels, followed by a scrap of data: a decompression bomb's face."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    scrap = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", scrap) + chunk(b"IEND", b"")


def bad_image_bytes() -> dict[str, bytes]:
    """Encoded images that cannot be used, by the kind the loader must report."""
    jpeg = encode(random_image(48), "JPEG")
    return {
        "empty_image": b"",
        "truncated_image": jpeg[: len(jpeg) // 2],
        "undecodable_image": bytes(np.random.default_rng(random.randrange(2**32)).integers(0, 256, 300,
                                                                                  dtype=np.uint8)),
        "too_many_pixels": png_claiming(10_000, 10_000),     # 100 Mpx: over our limit, under PIL's own error
    }


def convertible_image_bytes() -> dict[str, bytes]:
    """Encoded images in modes that must come out as RGB."""
    palette = random_image(16).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    values = np.random.default_rng(random.randrange(2**32)).integers(0, 65536, (16, 16))
    grey16 = Image.fromarray(values.astype(np.uint16))
    return {
        "cmyk_jpeg": encode(random_image(16, "CMYK"), "JPEG"),
        "grey16_png": encode(grey16, "PNG"),
        "palette_transparent_png": encode(palette, "PNG", transparency=0),
        "rgba_png": encode(random_image(16, "RGBA"), "PNG"),
        "grey_alpha_png": encode(random_image(16, "LA"), "PNG"),
        "webp": encode(random_image(16), "WEBP"),
        "grey_jpeg": encode(random_image(16, "L"), "JPEG"),
    }


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def bad_shard(path: Path, good: int = 6) -> tuple[dict[str, str], set[str]]:
    """A shard with `good` good samples and one sample of every bad kind; returns ({key: kind}, good keys)."""
    members, expected, good_keys = [], {}, set()
    for number in range(good):
        members += [(f"good{number}.png", encode(random_image(), "PNG")), (f"good{number}.txt", b"a good sample"),
                    (f"good{number}.cls", str(number % 3).encode())]
        good_keys.add(f"good{number}")
    for number, (name, data) in enumerate(convertible_image_bytes().items()):
        extension = "webp" if name == "webp" else "jpg" if name.endswith("jpeg") else "png"
        members += [(f"conv{number}.{extension}", data), (f"conv{number}.txt", f"a {name} image".encode())]
        good_keys.add(f"conv{number}")
    for kind, data in bad_image_bytes().items():
        members += [(f"{kind}.jpg", data), (f"{kind}.txt", b"a caption")]
        expected[kind] = kind
    jpeg = encode(random_image(), "JPEG")
    members += [("empty_caption.jpg", jpeg), ("empty_caption.txt", b""),
                ("blank_caption.jpg", jpeg), ("blank_caption.txt", b" \t\n "),
                ("latin1_caption.jpg", jpeg), ("latin1_caption.txt", "a caf\xe9 sign".encode("latin-1")),
                ("no_image.txt", b"a caption without its image"),
                ("no_caption.jpg", jpeg),
                ("bad_cls.jpg", jpeg), ("bad_cls.txt", b"a caption"), ("bad_cls.cls", b"17")]
    expected.update(empty_caption="empty_caption", blank_caption="empty_caption", latin1_caption="not_utf8",
                    no_image="missing_image", no_caption="missing_caption", bad_cls="bad_label")
    write_tar(path, members)
    (path.parent / "classes.txt").write_text("zero\none\ntwo\n")      # so that label 17 is out of range
    return expected, good_keys


def tensors(sample):
    """A picklable transform for loader tests: a tiny image tensor."""
    return {"pixels": torch.from_numpy(np.array(sample.image.convert("RGB").resize((8, 8))))}
