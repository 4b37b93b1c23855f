"""Captions cut short: a caption longer than the text length (--max-text-length) loses its tail.

The text tower sees a fixed number of tokens; the tokenizer truncates a longer caption on the right, so what the end
of the caption says never reaches the tower (on `shapes` at the default 16 tokens, about one caption in ten). The
loop counts these captions like bad samples and reports them in metrics.jsonl (`truncated_captions`) and in the
summary, so that a run says when --max-text-length is too short for its data.
"""

from __future__ import annotations

from typing import Any

import torch


class TruncationCheck:
    """Picklable (caption, its (L,) token ids as trained on) -> True when the tokenizer cut the caption short.

    With a pad token of its own (not also the end token), a caption that left a pad in its ids was not cut short,
    and that settles most captions at no cost. The rest are tokenised once more without truncation or padding: by a
    copy of a fast tokenizer's Rust tokenizer, or by the tokenizer itself, and compared with `length`.
    """

    def __init__(self, tokenizer: Any, length: int):
        from tokenizers import Tokenizer

        self.length = length
        pad, end = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.pad = pad if pad is not None and pad != end else None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.encoder = None if backend is None else Tokenizer.from_str(backend.to_str())
        self.tokenizer = tokenizer if backend is None else None
        if self.encoder is not None:
            self.encoder.no_truncation()
            self.encoder.no_padding()

    def __call__(self, caption: str, input_ids: torch.Tensor | None = None) -> bool:
        if input_ids is not None and self.pad is not None and self.pad in input_ids.tolist():
            return False
        if self.encoder is not None:
            return len(self.encoder.encode(caption).ids) > self.length
        return len(self.tokenizer(caption, truncation=False)["input_ids"]) > self.length


def truncation_line(truncated: int, samples: int, length: int, own_tokenizer: bool) -> str:
    """The summary's line about captions cut short, with the fraction of the training samples they were.

    own_tokenizer: the run trained its tokenizer (so --max-text-length set the length), rather than taking a
    checkpoint's (--init).
    """
    if not truncated:
        return f"captions cut short at {length} tokens: none"
    remedy = "raise --max-text-length" if own_tokenizer else "the length is the --init checkpoint's"
    return (f"captions cut short at {length} tokens: {truncated} of {samples} ({truncated / max(samples, 1):.1%}), "
            f"their ends never reached the text tower ({remedy})")
