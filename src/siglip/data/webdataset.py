"""WebDataset shards (local .tar files, one path or a brace pattern), read by random access through an index.

Why an index and not the `webdataset` streaming pipeline: training asks for sample i of a seeded order (global
batch k is samples [k*B, (k+1)*B)), which makes resume exact and lets every rank and DataLoader worker take
exactly its own samples, none twice and none skipped, whatever the shard sizes. Opening the source walks each
shard's tar headers once (seeking over the data, so it costs about one read per member), and records where each
member's bytes lie; a sample is then read with one positioned read per member. Sharding across ranks and workers
therefore happens at the level of samples, and the shuffle is a full permutation of all samples each epoch, not a
shuffle buffer. The library provides the shard patterns (`expand_urls`: braces and `::` lists) and the naming
convention (`base_plus_ext`: the key is the member's path up to the first dot of its file name). Compressed
shards (.tar.gz) allow no random access and are reported as unreadable: decompress them first.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from siglip.data.files import LABEL_TASK, parse_label, resolve_classes, resolve_templates
from siglip.data.sample import DEFAULT_MAX_IMAGE_PIXELS, BadSample, Sample, caption_id, check_caption, decode_image
from siglip.data.source import FiniteSource
from siglip.errors import UserError

logger = logging.getLogger("siglip.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")
"""Member extensions read as the image, in order of preference when a sample has several."""
CAPTION_EXTENSION = "txt"
LABEL_EXTENSION = "cls"
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
OPEN_SHARDS = 64
"""File descriptors kept open per process; shards beyond that are reopened when read again."""


class WebDatasetSource(FiniteSource):
    """Samples of local WebDataset shards: image (jpg/png/webp/...), caption (txt), optional label (cls)."""

    def __init__(self, spec: str, *, seed: int = 0, strict: bool = False, split: str = "train",
                 classes_file: str | None = None, templates_file: str | None = None, image_size: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.name, self.seed, self.strict, self.split = spec, seed, strict, split
        self.image_size, self.max_image_pixels = image_size, max_image_pixels
        self.shards = list_shards(spec)
        self.bad_shards: list[tuple[str, str]] = []
        """(path, reason) of every shard that could not be opened (or was damaged part way; its start is kept)."""
        self.records: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        """(shard number, key, {extension: (byte offset, size)}) of every sample, in shard order."""
        raw_labels: list[str] = []
        want_labels = classes_file is None and not (Path(self.shards[0]).parent / "classes.txt").is_file()
        for number, path in enumerate(self.shards):
            self._index_shard(number, path, raw_labels if want_labels else None)
        if not self.records:
            reasons = "; ".join(f"{path}: {reason}" for path, reason in self.bad_shards[:3]) or "the shards are empty"
            raise UserError(f"no samples could be read from {spec!r} ({reasons}); give readable .tar shards")
        self.class_names, self.tasks = None, {}
        if any(LABEL_EXTENSION in members for _, _, members in self.records):
            self.class_names = resolve_classes(classes_file, Path(self.shards[0]).parent, raw_labels)
            self.tasks = {LABEL_TASK: self.class_names} if self.class_names else {}
        self.templates = {LABEL_TASK: resolve_templates(templates_file)}
        self._descriptors: dict[int, int] = {}
        self._pid = os.getpid()

    def _index_shard(self, number: int, path: str, raw_labels: list[str] | None) -> None:
        """Append the shard's samples to self.records; a shard that cannot be read is reported and skipped."""
        try:
            with open(path, "rb") as handle:
                kind = next((name for magic, name in COMPRESSED_MAGIC.items()
                             if handle.read(6).startswith(magic)), None)
            if kind is not None:
                raise tarfile.ReadError(f"{kind}-compressed; random access needs a plain tar, decompress it first")
            with tarfile.open(path, mode="r:") as tar:
                current: tuple[str, dict[str, tuple[int, int]]] | None = None
                try:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, extension = base_plus_ext(member.name)
                        if key is None or Path(key).name.startswith("__"):
                            continue                     # no extension, or a metadata file such as __info__.json
                        if current is None or current[0] != key:
                            # A sample is consecutive members sharing a key, as webdataset groups them.
                            current = (key, {})
                            self.records.append((number, key, current[1]))
                        current[1][extension.lower()] = (member.offset_data, member.size)
                        if raw_labels is not None and extension.lower() == LABEL_EXTENSION:
                            raw_labels.append(tar.extractfile(member).read().decode("utf-8", "replace"))
                except (tarfile.TarError, OSError, EOFError) as error:
                    self._report_bad_shard(path, f"damaged after {len(self.records)} samples so far ({error})")
        except (tarfile.TarError, OSError, EOFError) as error:
            self._report_bad_shard(path, str(error))

    def _report_bad_shard(self, path: str, reason: str) -> None:
        if self.strict:
            raise BadSample("bad_shard", path, reason)
        logger.warning("skipping shard %s: %s", path, reason)
        self.bad_shards.append((path, reason))

    def _num_records(self) -> int:
        return len(self.records)

    def _read_record(self, record: int, index: int | None = None) -> Sample:
        number, member_key, members = self.records[record]
        key = f"{self.shards[number]}:{member_key}"
        image_extension = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        caption = check_caption(self._read_member(number, members, CAPTION_EXTENSION, key), key)
        if image_extension is None:
            raise BadSample("missing_image", key, f"no image member ({'/'.join(IMAGE_EXTENSIONS[:4])}) in the sample")
        data = self._read_member(number, members, image_extension, key)
        image = decode_image(data, key, max_pixels=self.max_image_pixels, draft_size=self.image_size)
        labels, positive_id = {}, caption_id(caption)
        raw_label = self._read_member(number, members, LABEL_EXTENSION, key)
        if raw_label is not None:
            text = check_caption(raw_label, key) if raw_label.strip() else ""
            if text:
                labels = {LABEL_TASK: parse_label(text, self.class_names, key)}
                positive_id = labels[LABEL_TASK]
        return Sample(image=image, caption=caption, key=key, labels=labels, positive_id=positive_id)

    def _read_member(self, number: int, members: dict[str, tuple[int, int]], extension: str, key: str) -> bytes | None:
        if extension not in members:
            return None
        offset, size = members[extension]
        try:
            data = os.pread(self._descriptor(number), size, offset)
        except OSError as error:
            raise BadSample("unreadable_file", key, f"reading {extension}: {error}") from None
        if len(data) < size:
            kind = "truncated_image" if extension in IMAGE_EXTENSIONS else "truncated_record"
            raise BadSample(kind, key, f"{extension} member has {len(data)} of its {size} bytes")
        return data

    def _descriptor(self, number: int) -> int:
        """An open descriptor for shard `number`; pread needs no shared file position, so forked workers are safe."""
        if self._pid != os.getpid():                   # inherited across a fork: keep the parent's, open our own
            self._descriptors, self._pid = {}, os.getpid()
        if number not in self._descriptors:
            if len(self._descriptors) >= OPEN_SHARDS:
                os.close(self._descriptors.pop(next(iter(self._descriptors))))
            self._descriptors[number] = os.open(self.shards[number], os.O_RDONLY)
        return self._descriptors[number]

    def test_samples(self) -> list[Sample]:
        """Every sample of the shards, in shard order (a WebDataset source is one split); bad ones skipped."""
        return list(self.iter_test_samples())

    def iter_test_samples(self, skipped: Counter[str] | None = None) -> Iterator[Sample]:
        """The same samples decoded one at a time (evaluation streams them); bad ones counted into `skipped`."""
        yield from self._iter_all(range(len(self.records)), self._read_record, skipped)

    def caption_corpus(self, count: int) -> list[str]:
        captions = []
        for number, member_key, members in self.records:
            if len(captions) >= count:
                break
            key = f"{self.shards[number]}:{member_key}"
            try:
                captions.append(check_caption(self._read_member(number, members, CAPTION_EXTENSION, key), key))
            except BadSample:
                continue
        return captions + self.prompts()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_descriptors"] = {}                     # descriptors do not travel; each process opens its own
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for descriptor in getattr(self, "_descriptors", {}).values():
                try:
                    os.close(descriptor)
                except OSError:
                    pass


def list_shards(spec: str) -> list[str]:
    """The shard paths of a path, a brace pattern ("data/train-{000..009}.tar"), a `::` list, or a directory."""
    if os.path.isdir(spec):
        shards = sorted(str(path) for path in Path(spec).glob("*.tar"))
        if not shards:
            raise UserError(f"directory {spec} holds no .tar shards; give a shard path or pattern")
        return shards
    shards = expand_urls(spec)
    remote = [shard for shard in shards if "://" in shard or shard.startswith("pipe:")]
    if remote:
        raise UserError(f"shard {remote[0]!r} is not a local file; siglip reads local shards only, download them first")
    return shards
