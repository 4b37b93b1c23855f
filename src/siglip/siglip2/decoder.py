"""The LocCa decoder of SigLIP 2: a small transformer that reads the image tower's patch tokens and writes text.

SigLIP 2 (Tschannen et al., 2025, sec. 2.2) trains the image tower with LocCa's decoder (Wan et al., 2024) beside
the sigmoid loss: a transformer decoder with causal self-attention over the target tokens and cross-attention to
the tower's unpooled patch tokens, trained with teacher forcing on captioning, referring expressions and grounded
captioning (the sequences of siglip.siglip2.boxes). The decoder is discarded after training; the tower keeps what
it learned. It is built from torch's own `nn.TransformerDecoder` (pre-norm blocks, GELU, no dropout).

    patch tokens (n, P, D) -> Linear -> memory (n, P, w)
    tokens (n, T) -> embedding + learned positions -> blocks (causal self-attention, cross-attention) -> LayerNorm
        -> Linear -> logits (n, T, V)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from siglip.siglip2.boxes import DecoderVocabulary


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the decoder; saved beside its weights (`asdict` / `DecoderConfig(**fields)`)."""

    vocab_size: int
    """`DecoderVocabulary.size`: text, location and task tokens."""
    vision_width: int
    """D of the image tower's patch tokens (its hidden size)."""
    width: int = 256
    layers: int = 2
    heads: int = 4
    mlp: int = 1024
    max_length: int = 64
    """Longest token sequence (task token included) the position table holds."""
    pad_id: int = 0
    """Target positions holding this id are never scored (`DecoderVocabulary.pad_id`)."""

    def asdict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class LocCaDecoder(nn.Module):
    """Causal transformer decoder over target tokens, cross-attending to (n, P, D) patch tokens."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width {config.width} must be a multiple of heads {config.heads}")
        self.config = config
        self.memory_projection = nn.Linear(config.vision_width, config.width)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        block = nn.TransformerDecoderLayer(config.width, config.heads, config.mlp, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(block, config.layers, norm=nn.LayerNorm(config.width))
        self.output = nn.Linear(config.width, config.vocab_size)

    def logits(self, patch_tokens: torch.Tensor, input_tokens: torch.Tensor) -> torch.Tensor:
        """(n, P, D) patch tokens and (n, T) input ids -> (n, T, V) logits; position t sees inputs 0..t only."""
        return self._logits(self.memory_projection(patch_tokens), input_tokens)

    def loss(self, patch_tokens: torch.Tensor, target_tokens: torch.Tensor, scored: torch.Tensor | None = None,
             *, reduction: str = "mean") -> torch.Tensor:
        """Teacher-forced cross-entropy of the targets: a 0-d tensor.

        The inputs are target_tokens[:, :-1] and position t predicts target_tokens[:, t + 1]. A prediction counts
        when its target is not padding and, if `scored` ((n, T) bool, `pad_targets`) is given, is scored there.
        Each example's loss is the mean over its counted predictions (0 when it has none); "mean" averages the
        examples, "sum" adds them, so that micro-batches divided by the whole batch's n add up to "mean" of it.
        """
        if target_tokens.dim() != 2 or target_tokens.shape[1] < 2:
            raise ValueError(f"target_tokens must be (n, T) with T >= 2, got {tuple(target_tokens.shape)}")
        if scored is not None and scored.shape != target_tokens.shape:
            raise ValueError(f"scored must have target_tokens' shape {tuple(target_tokens.shape)}, "
                             f"got {tuple(scored.shape)}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        per_example, _ = self.target_losses(self.memory_projection(patch_tokens), target_tokens, scored)
        return per_example.mean() if reduction == "mean" else per_example.sum()

    def sample_losses(self, patch_tokens: torch.Tensor, target_tokens: torch.Tensor,
                      scored: torch.Tensor | None = None) -> torch.Tensor:
        """Several targets per image: (n, P, D) patch tokens and (n, K, T) targets (`boxes.stack_targets`) -> (n,)
        each image's mean over its targets that hold a counted prediction of their teacher-forced loss (each the
        mean over its counted predictions, as in `loss`); 0 for an image without any. The memory is projected once
        per image, not once per target."""
        if target_tokens.dim() != 3 or target_tokens.shape[0] != patch_tokens.shape[0]:
            raise ValueError(f"target_tokens must be (n, K, T) with n = {patch_tokens.shape[0]}, got "
                             f"{tuple(target_tokens.shape)}")
        n, per_image, length = target_tokens.shape
        memory = self.memory_projection(patch_tokens).repeat_interleave(per_image, dim=0)   # (n K, P, w)
        flat_scored = None if scored is None else scored.reshape(n * per_image, length)
        losses, present = self.target_losses(memory, target_tokens.reshape(n * per_image, length), flat_scored)
        losses, present = losses.reshape(n, per_image), present.reshape(n, per_image).to(losses.dtype)
        return (losses * present).sum(dim=1) / present.sum(dim=1).clamp(min=1.0)

    def target_losses(self, memory: torch.Tensor, target_tokens: torch.Tensor, scored: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, P, w) projected memory and (m, T) targets -> ((m,) mean loss over each target's counted predictions,
        0 without any; (m,) bool: whether it has a counted prediction)."""
        predicted = target_tokens[:, 1:]                                           # (m, T - 1)
        counted = predicted != self.config.pad_id
        if scored is not None:
            counted = counted & scored[:, 1:]
        logits = self._logits(memory, target_tokens[:, :-1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))          # (m, T - 1, V)
        # -log softmax(logits)[target] at every position, in float32 whatever the towers' autocast dtype
        token_losses = F.cross_entropy(logits.transpose(1, 2), predicted, reduction="none")
        weights = counted.to(token_losses.dtype)
        counts = weights.sum(dim=1)
        return (token_losses * weights).sum(dim=1) / counts.clamp(min=1.0), counts > 0

    @torch.no_grad()
    def generate(self, patch_tokens: torch.Tensor, prompt: torch.Tensor, steps: int,
                 allowed: range | None = None) -> torch.Tensor:
        """Greedy decoding: (n, p) prompt ids -> (n, steps) ids, each the argmax given all before it.

        allowed: restrict every generated token to these ids (a contiguous range: the location tokens for a box).
        """
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be (n, p) ids with p >= 1, got {tuple(prompt.shape)}")
        if prompt.shape[1] + steps > self.config.max_length:
            raise ValueError(f"a prompt of {prompt.shape[1]} tokens and {steps} steps exceed the decoder's "
                             f"{self.config.max_length} positions")
        memory = self.memory_projection(patch_tokens)
        tokens = prompt
        for _ in range(steps):
            last = self._logits(memory, tokens)[:, -1]                             # (n, V)
            if allowed is not None:
                outside = torch.ones(last.shape[-1], dtype=torch.bool, device=last.device)
                outside[allowed.start:allowed.stop] = False
                last = last.masked_fill(outside, float("-inf"))
            tokens = torch.cat([tokens, last.argmax(dim=-1, keepdim=True)], dim=1)
        return tokens[:, prompt.shape[1]:]

    def _logits(self, memory: torch.Tensor, input_tokens: torch.Tensor) -> torch.Tensor:
        length = input_tokens.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"{length} input tokens exceed the decoder's {self.config.max_length} positions")
        hidden = self.token_embedding(input_tokens) + self.position_embedding[:length]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=hidden.device, dtype=hidden.dtype)
        hidden = self.blocks(hidden, memory, tgt_mask=causal, tgt_is_causal=True)
        return self.output(hidden)


@torch.no_grad()
def predict_boxes(decoder: LocCaDecoder, vocab: DecoderVocabulary, patch_tokens: torch.Tensor,
                  prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Referring expressions -> (n, 4) boxes (x0, y0, x1, y1) as fractions of the image's sides.

    prompts[i] is `boxes.refer_prompt(vocab, phrase_ids)` for image i (patch_tokens[i]); four location tokens are
    decoded greedily, each restricted to the location range. Prompts of equal length are decoded together.
    """
    if len(prompts) != patch_tokens.shape[0]:
        raise ValueError(f"one prompt per image: {len(prompts)} prompts for {patch_tokens.shape[0]} images")
    boxes = torch.empty(len(prompts), 4, dtype=torch.float64)
    locations = range(vocab.location_start, vocab.location_start + vocab.bins)
    for length in sorted({len(prompt) for prompt in prompts}):
        rows = [row for row, prompt in enumerate(prompts) if len(prompt) == length]
        prompt = torch.tensor([list(prompts[row]) for row in rows], dtype=torch.int64, device=patch_tokens.device)
        tokens = decoder.generate(patch_tokens[rows], prompt, 4, allowed=locations)
        for row, box_tokens in zip(rows, tokens.tolist(), strict=True):
            boxes[row] = torch.tensor(vocab.box_from_tokens(box_tokens), dtype=torch.float64)
    return boxes


def paper_decoder_config(vocab: DecoderVocabulary, text_config, vision_width: int, max_length: int) -> DecoderConfig:
    """The decoder SigLIP 2 attaches (sec. 2.2): "the shapes of the text encoder except that we add cross-attention
    layers and reduce the number of layers by a factor of two" (at least one layer).

    text_config: the SigLIP text tower's config (hidden_size, num_attention_heads, intermediate_size,
    num_hidden_layers); max_length: the longest target sequence, task token included.
    """
    return DecoderConfig(vocab_size=vocab.size, vision_width=vision_width, width=int(text_config.hidden_size),
                         layers=max(1, int(text_config.num_hidden_layers) // 2),
                         heads=int(text_config.num_attention_heads), mlp=int(text_config.intermediate_size),
                         max_length=max_length, pad_id=vocab.pad_id)
