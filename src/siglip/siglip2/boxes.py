"""LocCa's decoder vocabulary and target sequences: boxes as quantised coordinate tokens (Wan et al., 2024).

The decoder of the SigLIP 2 recipe (Tschannen et al., 2025, sec. 2.2) learns three tasks from one image:

    captioning           <caption> caption </s>                    scored: the caption and </s>
    referring expression <refer> phrase </s> x0 y0 x1 y1 </s>      scored: the four box tokens and the last </s>
    grounded captioning  <ground> x0 y0 x1 y1 phrase </s>          scored: the phrase and </s>

Its vocabulary is the text tokenizer's, followed by `bins` location tokens and three task tokens:

    [0, text_size)                       text ids, as the tokenizer gives them (<pad> = 0 and </s> = 1 in ours)
    [text_size, text_size + bins)        location bin k: a coordinate in [k / bins, (k + 1) / bins)
    text_size + bins + 0, 1, 2           <caption>, <refer>, <ground>

One token per coordinate, (x0, y0, x1, y1) in that order, each a fraction of the image's width or height. A
coordinate is decoded to its bin's centre, so the round trip is off by at most half a bin: 1 / (2 bins).
A sample without regions (any source but shapes) trains on captioning alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from siglip.data.sample import Region

Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1)."""

CAPTION, REFER, GROUND = "caption", "refer", "ground"
TASKS = (CAPTION, REFER, GROUND)


@dataclass(frozen=True)
class DecoderVocabulary:
    """The decoder's token ids: text, then location bins, then the three task tokens (see the module docstring)."""

    text_size: int
    """The text tokenizer's size, `len(tokenizer)`."""
    bins: int = 256
    """Location tokens per coordinate; a box's round trip is then within 1 / (2 bins) of the image's side."""
    pad_id: int = 0
    """Pads target sequences on the right; never scored. The tokenizer's <pad> (siglip.model.PAD_TOKEN_ID)."""
    eos_id: int = 1
    """Ends every target sequence. The tokenizer's </s> (siglip.model.EOS_TOKEN_ID)."""

    def __post_init__(self) -> None:
        if self.text_size < 2 or self.bins < 2:
            raise ValueError(f"text_size and bins must be at least 2, got {self.text_size} and {self.bins}")
        if not (0 <= self.pad_id < self.text_size and 0 <= self.eos_id < self.text_size):
            raise ValueError(f"pad_id {self.pad_id} and eos_id {self.eos_id} must be text ids in [0, {self.text_size})")

    @property
    def size(self) -> int:
        """Rows of the decoder's embedding and output layer."""
        return self.text_size + self.bins + len(TASKS)

    @property
    def location_start(self) -> int:
        return self.text_size

    def task_id(self, task: str) -> int:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        return self.text_size + self.bins + TASKS.index(task)

    def box_tokens(self, box: Box) -> list[int]:
        """Four location token ids of a box given as fractions of the image's sides, each in [0, 1]."""
        return [self.location_start + quantise(coordinate, self.bins) for coordinate in box]

    def box_from_tokens(self, tokens: Sequence[int]) -> Box:
        """The box (fractions of the image's sides) that four location token ids stand for: each bin's centre."""
        if len(tokens) != 4:
            raise ValueError(f"a box is four location tokens, got {len(tokens)}")
        bins = [int(token) - self.location_start for token in tokens]
        if min(bins) < 0 or max(bins) >= self.bins:
            raise ValueError(f"tokens {list(tokens)} are not all location tokens "
                             f"[{self.location_start}, {self.location_start + self.bins})")
        return tuple(dequantise(index, self.bins) for index in bins)


def quantise(coordinate: float, bins: int) -> int:
    """The bin of a coordinate in [0, 1]: floor(coordinate * bins), with 1.0 in the last bin."""
    if not 0.0 <= coordinate <= 1.0:
        raise ValueError(f"a box coordinate must be a fraction of the image side in [0, 1], got {coordinate}")
    return min(math.floor(coordinate * bins), bins - 1)


def dequantise(index: int, bins: int) -> float:
    """The centre of bin `index`: (index + 1/2) / bins; within 1 / (2 bins) of every coordinate of that bin."""
    return (index + 0.5) / bins


def normalise_box(box: Box, width: int, height: int) -> Box:
    """A box in pixels -> fractions of the image's width and height (what location tokens encode)."""
    x0, y0, x1, y1 = box
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def longest_target(text_length: int) -> int:
    """Tokens of the longest target over texts of at most `text_length` tokens (</s> included):
    <refer> phrase x0 y0 x1 y1 </s> is the text and 6 more."""
    return text_length + 6


def location_bins(model) -> int:
    """Location tokens per coordinate for a tower: one per pixel of its square input (32 for the tiny preset, 224 for
    base), so that a box decodes to within half a pixel of what the tower saw, and no two bins split one pixel that
    the decoder would have to learn to tell apart (LocCa's 1,000 bins suit its 224-384 px inputs poorly at 32 px)."""
    return int(model.config.vision_config.image_size)


def tokenizer_vocabulary(tokenizer, bins: int = 256) -> DecoderVocabulary:
    """The decoder vocabulary over a text tokenizer: its size, its <pad> and </s> ids."""
    return DecoderVocabulary(text_size=len(tokenizer), bins=bins, pad_id=tokenizer.pad_token_id,
                             eos_id=tokenizer.eos_token_id)


class TextEncoder:
    """text -> the tokenizer's ids, cut to `length` tokens and ending in </s> (picklable: it runs in DataLoader
    workers). Ours end every text in </s> already; a tokenizer without that template (Gemma's) gets one added."""

    def __init__(self, tokenizer, length: int):
        self.tokenizer, self.length, self.eos_id = tokenizer, length, tokenizer.eos_token_id

    def __call__(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, truncation=True, max_length=self.length, padding=False)["input_ids"])
        if not ids or ids[-1] != self.eos_id:
            ids = ids[:self.length - 1] + [self.eos_id]
        return ids


@dataclass(frozen=True)
class DecoderTarget:
    """One target sequence: its tokens (the task token first) and which of them the loss scores."""

    task: str
    tokens: tuple[int, ...]
    scored: tuple[bool, ...]
    """Per token: whether predicting it counts. The task token and a task's prompt are given, not predicted."""


def caption_target(vocab: DecoderVocabulary, caption_ids: Sequence[int]) -> DecoderTarget:
    """<caption> caption </s>; `caption_ids` are the tokenizer's ids of the caption, ending in </s>."""
    _check_text(vocab, caption_ids, "caption_ids")
    return DecoderTarget(CAPTION, (vocab.task_id(CAPTION), *caption_ids), (False,) + (True,) * len(caption_ids))


def refer_target(vocab: DecoderVocabulary, phrase_ids: Sequence[int], box: Box) -> DecoderTarget:
    """<refer> phrase </s> x0 y0 x1 y1 </s>: the box (fractions of the image's sides) from the phrase."""
    _check_text(vocab, phrase_ids, "phrase_ids")
    prompt = (vocab.task_id(REFER), *phrase_ids)
    answer = (*vocab.box_tokens(box), vocab.eos_id)
    return DecoderTarget(REFER, prompt + answer, (False,) * len(prompt) + (True,) * len(answer))


def ground_target(vocab: DecoderVocabulary, box: Box, phrase_ids: Sequence[int]) -> DecoderTarget:
    """<ground> x0 y0 x1 y1 phrase </s>: the phrase of the object in the box (fractions of the image's sides)."""
    _check_text(vocab, phrase_ids, "phrase_ids")
    prompt = (vocab.task_id(GROUND), *vocab.box_tokens(box))
    return DecoderTarget(GROUND, prompt + tuple(phrase_ids), (False,) * len(prompt) + (True,) * len(phrase_ids))


def refer_prompt(vocab: DecoderVocabulary, phrase_ids: Sequence[int]) -> list[int]:
    """<refer> phrase </s>: what greedy decoding continues with a box (siglip.siglip2.decoder.predict_boxes)."""
    _check_text(vocab, phrase_ids, "phrase_ids")
    return [vocab.task_id(REFER), *phrase_ids]


def sample_target(
    vocab: DecoderVocabulary,
    caption: str,
    regions: Sequence[Region] | None,
    image_size: tuple[int, int],
    encode: Callable[[str], Sequence[int]],
    rng: random.Random,
    tasks: Sequence[str] = TASKS,
) -> DecoderTarget:
    """One sample's decoder target: a task drawn uniformly from `tasks` (captioning alone without regions), and
    for the box tasks a region drawn uniformly.

    Args:
        caption: the sample's caption; regions: its Regions (Sample.regions), None or empty for most sources.
        image_size: (width, height) of the image the regions' boxes are measured in, in pixels.
        encode: text -> the tokenizer's ids ending in </s>, unpadded
            (`lambda text: tokenizer(text)["input_ids"]` for ours).
        rng: the draw; seed it from (seed, sample index) for a target that a resumed run draws again.
    """
    unknown = set(tasks) - set(TASKS)
    if not tasks or unknown:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    available = [task for task in tasks if task == CAPTION or regions]
    if not available:
        raise ValueError(f"tasks {list(tasks)} all need regions, and this sample has none; include {CAPTION!r}")
    task = rng.choice(available)
    if task == CAPTION:
        return caption_target(vocab, encode(caption))
    region = rng.choice(list(regions))
    box = normalise_box(region.box, *image_size)
    if task == REFER:
        return refer_target(vocab, encode(region.phrase), box)
    return ground_target(vocab, box, encode(region.phrase))


def sample_targets(
    vocab: DecoderVocabulary,
    caption: str,
    regions: Sequence[Region] | None,
    image_size: tuple[int, int],
    encode: Callable[[str], Sequence[int]],
    rng: random.Random,
) -> list[DecoderTarget]:
    """All of one sample's decoder targets, in TASKS order, as SigLIP 2 trains its decoder ("for each example, the
    decoder is trained to predict all three targets", sec. 2.2): the caption, and with regions a referring
    expression and a grounded caption, each of a region drawn uniformly (two draws). Without regions: the caption.

    Arguments as for `sample_target`.
    """
    targets = [caption_target(vocab, encode(caption))]
    if regions:
        refer_region, ground_region = rng.choice(list(regions)), rng.choice(list(regions))
        targets.append(refer_target(vocab, encode(refer_region.phrase), normalise_box(refer_region.box, *image_size)))
        targets.append(ground_target(vocab, normalise_box(ground_region.box, *image_size),
                                     encode(ground_region.phrase)))
    return targets


def stack_targets(per_sample: Sequence[Sequence[DecoderTarget]], length: int, pad_id: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's targets -> ((n, K, length) int64 tokens, (n, K, length) bool scored), K = len(TASKS): target
    k of sample i sits in row [i, TASKS.index(task)]; a task a sample lacks is all padding, never scored."""
    tokens = torch.full((len(per_sample), len(TASKS), length), pad_id, dtype=torch.int64)
    scored = torch.zeros((len(per_sample), len(TASKS), length), dtype=torch.bool)
    for row, targets in enumerate(per_sample):
        if targets:
            padded, mask = pad_targets(targets, length, pad_id)
            where = [TASKS.index(target.task) for target in targets]
            tokens[row, where], scored[row, where] = padded, mask
    return tokens, scored


def pad_targets(targets: Sequence[DecoderTarget], length: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets -> ((n, length) int64 tokens, (n, length) bool scored), right-padded with `pad_id` (not scored).

    Longer targets are cut to `length` tokens (a cut sequence loses its </s>: size `length` for the longest caption).
    """
    if length < 2:
        raise ValueError(f"length must be at least 2 (a task token and one predicted token), got {length}")
    tokens = torch.full((len(targets), length), pad_id, dtype=torch.int64)
    scored = torch.zeros((len(targets), length), dtype=torch.bool)
    for row, target in enumerate(targets):
        kept = min(len(target.tokens), length)
        tokens[row, :kept] = torch.tensor(target.tokens[:kept], dtype=torch.int64)
        scored[row, :kept] = torch.tensor(target.scored[:kept], dtype=torch.bool)
    return tokens, scored


def _check_text(vocab: DecoderVocabulary, ids: Sequence[int], name: str) -> None:
    if len(ids) == 0:
        raise ValueError(f"{name} is empty; encode the text with the tokenizer (its ids end in </s>)")
    if min(ids) < 0 or max(ids) >= vocab.text_size:
        raise ValueError(f"{name} must be text ids in [0, {vocab.text_size}), got values in [{min(ids)}, {max(ids)}]")
