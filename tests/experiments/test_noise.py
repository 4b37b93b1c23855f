"""siglip.experiments.noise: each corruption does what it says, and only that, reproducibly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from siglip.experiments.design import TrainBatch
from siglip.experiments.noise import KINDS, Corrupt, corrupt_batch, fresh_ids


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def make_batch(n: int, length: int, vocab: int, generator: torch.Generator) -> TrainBatch:
    """Captions with left padding (id 0) and an end token (id 1) last, as the tokenizer lays them out."""
    ids = torch.randint(3, vocab, (n, length), generator=generator)
    words = torch.randint(1, length - 1, (n,), generator=generator)
    for row in range(n):
        ids[row, : length - 1 - words[row]] = 0
        ids[row, -1] = 1
    pixels = torch.randn(n, 3, 8, 8, generator=generator)
    return TrainBatch(pixels, ids, torch.randint(0, 5, (n,), generator=generator))


DATA = SimpleNamespace(vocab_size=50, special_ids=torch.tensor([0, 1, 2]), pixel_mean=torch.tensor([0.5, 0.4, 0.3]),
                       pixel_std=torch.tensor([0.5, 0.2, 0.25]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_corruptions_do_what_they_say(kind, fraction):
    n = 40
    seed = fresh_seed()
    batch = make_batch(n, 12, DATA.vocab_size, torch.Generator().manual_seed(seed))
    out, touched = corrupt_batch(batch, kind, fraction, DATA, torch.Generator().manual_seed(seed))
    parts = ("image", "text", "shuffle") if kind == "all" else (kind,)
    assert set(touched) == set(parts)
    for rows in touched.values():
        assert rows.numel() == round(fraction * n) and rows.unique().numel() == rows.numel()
    image_rows = touched.get("image", torch.empty(0, dtype=torch.long))
    text_rows = torch.cat([touched.get(part, torch.empty(0, dtype=torch.long)) for part in ("text", "shuffle")])

    clean_pixels = torch.ones(n, dtype=torch.bool)
    clean_pixels[image_rows] = False
    assert torch.equal(out.pixel_values[clean_pixels], batch.pixel_values[clean_pixels])
    low = (0 - DATA.pixel_mean) / DATA.pixel_std
    high = (1 - DATA.pixel_mean) / DATA.pixel_std
    for row in image_rows:
        noise = out.pixel_values[row]
        assert ((noise >= low[:, None, None] - 1e-6) & (noise <= high[:, None, None] + 1e-6)).all()
        assert noise.flatten().unique().numel() > 0.9 * noise.numel(), "noise pixels should be distinct"

    clean_text = torch.ones(n, dtype=torch.bool)
    clean_text[text_rows] = False
    assert torch.equal(out.input_ids[clean_text], batch.input_ids[clean_text])
    special = torch.isin(batch.input_ids, DATA.special_ids)
    if kind == "text":
        for row in touched["text"]:
            # Same length and layout: specials where they were, random non-special tokens elsewhere.
            assert torch.equal(torch.isin(out.input_ids[row], DATA.special_ids), special[row])
            assert bool((out.input_ids[row][~special[row]] < DATA.vocab_size).all())
        changed = (out.input_ids != batch.input_ids)[touched["text"]].sum()
        words = (~special[touched["text"]]).sum()
        assert changed >= 0.8 * words, "random tokens should mostly differ from the originals"
    if kind == "shuffle":
        rows = touched["shuffle"]
        before, after = batch.input_ids[rows], out.input_ids[rows]
        assert before.unique(dim=0).shape[0] == rows.numel(), "drawn captions are distinct, so a fixed point shows"
        assert sorted(map(tuple, after.tolist())) == sorted(map(tuple, before.tolist())), "a permutation of themselves"
        assert not (after == before).all(1).any(), "no chosen row keeps its own caption"

    touched_rows = torch.zeros(n, dtype=torch.bool)
    for rows in touched.values():
        touched_rows[rows] = True
    corrupted_ids = out.positive_ids[touched_rows]
    assert corrupted_ids.unique().numel() == corrupted_ids.numel(), "each corrupted pair is only its own positive"
    assert not torch.isin(corrupted_ids, out.positive_ids[~touched_rows]).any()

    again, again_touched = corrupt_batch(batch, kind, fraction, DATA, torch.Generator().manual_seed(seed))
    assert torch.equal(again.pixel_values, out.pixel_values) and torch.equal(again.input_ids, out.input_ids)
    assert all(torch.equal(again_touched[part], touched[part]) for part in touched)


def test_all_draws_each_corruption_independently():
    n, fraction = 64, 0.5
    batch = make_batch(n, 10, DATA.vocab_size, torch.Generator().manual_seed(fresh_seed()))
    _, touched = corrupt_batch(batch, "all", fraction, DATA, torch.Generator().manual_seed(fresh_seed()))
    assert not (torch.equal(touched["image"], touched["text"]) and torch.equal(touched["text"], touched["shuffle"]))


def test_fresh_ids_keep_clean_equalities():
    ids = torch.tensor([7, 3, 7, 9, 3, 7])
    corrupted = torch.tensor([False, True, False, False, False, True])
    out = fresh_ids(ids, corrupted)
    clean = ~corrupted
    assert torch.equal(out[clean][:, None] == out[clean][None, :], ids[clean][:, None] == ids[clean][None, :])
    assert out[1] != out[5] and not torch.isin(out[corrupted], out[clean]).any()


def test_corrupt_arm_hook_is_the_batch_corruption():
    seed = fresh_seed()
    batch = make_batch(32, 10, DATA.vocab_size, torch.Generator().manual_seed(seed))
    hook = Corrupt("all", 0.25)
    out = hook(batch, DATA, torch.Generator().manual_seed(seed))
    want, _ = corrupt_batch(batch, "all", 0.25, DATA, torch.Generator().manual_seed(seed))
    assert torch.equal(out.pixel_values, want.pixel_values) and torch.equal(out.input_ids, want.input_ids)
