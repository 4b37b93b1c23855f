"""The paper's studies: their pieces against literal references, and every study's smoke run end to end."""

from __future__ import annotations

import math
import re

import pytest
import torch

from reference import reference_sigmoid_loss, unit_rows
from siglip.experiments.beta2 import count_spikes, largest_rise
from siglip.experiments.common import TrainBatch, batch_indices, compare, smooth
from siglip.experiments.negatives import masked_sigmoid_loss, matched_steps, negative_mask, pair_labels
from siglip.experiments.noise import KINDS, Corruption, corrupt_batch, fresh_ids
from siglip.experiments.positives import duplicates_per_batch, off_diagonal_positives
from siglip.experiments.report import Plot, Report, Series, Table, write_report
from siglip.loss import sigmoid_loss

STUDIES = ("batch-size", "init", "negatives", "noise", "beta2", "siglit", "positives")


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def literal_masked_loss(x, y, t, b, keep, ids=None):
    """-(1/n) sum over kept (i, j) of log sigmoid(z_ij (t x_i.y_j + b)), one pair at a time, float64."""
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if keep[i, j]:
                positive = (i == j) if ids is None else bool(ids[i] == ids[j])
                z = 1.0 if positive else -1.0
                total = total - torch.nn.functional.logsigmoid(z * (t * (x[i] @ y[j]) + b))
    return total / n


@pytest.mark.parametrize("with_ids", [False, True])
def test_masked_loss_matches_literal_reference(with_ids):
    n, d = 11, 6
    x, y = unit_rows(n, d).requires_grad_(), unit_rows(n, d).requires_grad_()
    t = torch.tensor(float(torch.empty(()).uniform_(1, 20)), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(float(torch.empty(()).uniform_(-10, 2)), dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 4, (n,)) if with_ids else None
    keep = torch.rand(n, n) < 0.4
    got = masked_sigmoid_loss(x, y, t, b, keep, ids)
    want = literal_masked_loss(x, y, t, b, keep, ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    got_grads = torch.autograd.grad(got, (x, y, t, b))
    want_grads = torch.autograd.grad(want, (x, y, t, b))
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_masked_loss_keeping_everything_is_the_full_loss():
    n, d = 33, 8
    x, y = unit_rows(n, d), unit_rows(n, d)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.5, dtype=torch.float64)
    ids = torch.randint(0, 5, (n,))
    keep = torch.ones(n, n, dtype=torch.bool)
    torch.testing.assert_close(masked_sigmoid_loss(x, y, t, b, keep), reference_sigmoid_loss(x, y, t, b), rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(masked_sigmoid_loss(x, y, t, b, keep, ids), sigmoid_loss(x, y, t, b, positive_ids=ids),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("choice", ["random", "easy", "hard"])
def test_negative_mask_keeps_positives_and_the_right_negatives(choice):
    n = 24
    ratio = float(torch.empty(()).uniform_(0.1, 0.9))
    ids = torch.randint(0, 6, (n,))
    positive = pair_labels(n, ids)
    logits = torch.randn(n, n, dtype=torch.float64)
    keep = negative_mask(logits, positive, ratio, choice, torch.Generator().manual_seed(fresh_seed()))
    negatives = ~positive
    assert bool(keep[positive].all()), "every positive pair must be kept"
    assert int((keep & negatives).sum()) == round(ratio * int(negatives.sum()))
    kept, dropped = logits[keep & negatives], logits[~keep & negatives]
    if choice == "hard":
        assert kept.min() >= dropped.max()
    elif choice == "easy":
        assert kept.max() <= dropped.min()
    else:
        seed = fresh_seed()
        first = negative_mask(logits, positive, ratio, choice, torch.Generator().manual_seed(seed))
        again = negative_mask(logits, positive, ratio, choice, torch.Generator().manual_seed(seed))
        other = negative_mask(logits, positive, ratio, choice, torch.Generator().manual_seed(seed + 1))
        assert torch.equal(first, again) and not torch.equal(first, other)


def test_matched_steps_sees_as_many_pairs():
    batch, steps, ratio = 64, 100, 0.25
    longer = matched_steps(steps, batch, ratio)
    kept_per_step = batch + round(ratio * batch * (batch - 1))
    assert abs(longer * kept_per_step - steps * batch * batch) <= kept_per_step


def make_batch(n: int, length: int, vocab: int, generator: torch.Generator) -> TrainBatch:
    """Captions with left padding (id 0) and an end token (id 1) last, as the tokenizer lays them out."""
    ids = torch.randint(3, vocab, (n, length), generator=generator)
    words = torch.randint(1, length - 1, (n,), generator=generator)
    for row in range(n):
        ids[row, : length - 1 - words[row]] = 0
        ids[row, -1] = 1
    pixels = torch.randn(n, 3, 8, 8, generator=generator)
    return TrainBatch(pixels, ids, torch.randint(0, 5, (n,), generator=generator))


CORRUPTION = Corruption(vocab_size=50, special_ids=torch.tensor([0, 1, 2]), pixel_mean=torch.tensor([0.5, 0.4, 0.3]),
                        pixel_std=torch.tensor([0.5, 0.2, 0.25]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_corruptions_do_what_they_say(kind, fraction):
    n = 40
    seed = fresh_seed()
    batch = make_batch(n, 12, CORRUPTION.vocab_size, torch.Generator().manual_seed(seed))
    out, touched = corrupt_batch(batch, kind, fraction, CORRUPTION, torch.Generator().manual_seed(seed))
    parts = ("image", "text", "shuffle") if kind == "all" else (kind,)
    assert set(touched) == set(parts)
    for rows in touched.values():
        assert rows.numel() == round(fraction * n) and rows.unique().numel() == rows.numel()
    image_rows = touched.get("image", torch.empty(0, dtype=torch.long))
    text_rows = torch.cat([touched.get(part, torch.empty(0, dtype=torch.long)) for part in ("text", "shuffle")])

    clean_pixels = torch.ones(n, dtype=torch.bool)
    clean_pixels[image_rows] = False
    assert torch.equal(out.pixel_values[clean_pixels], batch.pixel_values[clean_pixels])
    low = (0 - CORRUPTION.pixel_mean) / CORRUPTION.pixel_std
    high = (1 - CORRUPTION.pixel_mean) / CORRUPTION.pixel_std
    for row in image_rows:
        noise = out.pixel_values[row]
        assert ((noise >= low[:, None, None] - 1e-6) & (noise <= high[:, None, None] + 1e-6)).all()
        assert noise.flatten().unique().numel() > 0.9 * noise.numel(), "noise pixels should be distinct"

    clean_text = torch.ones(n, dtype=torch.bool)
    clean_text[text_rows] = False
    assert torch.equal(out.input_ids[clean_text], batch.input_ids[clean_text])
    special = torch.isin(batch.input_ids, CORRUPTION.special_ids)
    if kind == "text":
        for row in touched["text"]:
            # Same length and layout: specials where they were, random non-special tokens elsewhere.
            assert torch.equal(torch.isin(out.input_ids[row], CORRUPTION.special_ids), special[row])
            assert bool((out.input_ids[row][~special[row]] < CORRUPTION.vocab_size).all())
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

    again, again_touched = corrupt_batch(batch, kind, fraction, CORRUPTION, torch.Generator().manual_seed(seed))
    assert torch.equal(again.pixel_values, out.pixel_values) and torch.equal(again.input_ids, out.input_ids)
    assert all(torch.equal(again_touched[part], touched[part]) for part in touched)


def test_all_draws_each_corruption_independently():
    n, fraction = 64, 0.5
    batch = make_batch(n, 10, CORRUPTION.vocab_size, torch.Generator().manual_seed(fresh_seed()))
    _, touched = corrupt_batch(batch, "all", fraction, CORRUPTION, torch.Generator().manual_seed(fresh_seed()))
    assert not (torch.equal(touched["image"], touched["text"]) and torch.equal(touched["text"], touched["shuffle"]))


def test_fresh_ids_keep_clean_equalities():
    ids = torch.tensor([7, 3, 7, 9, 3, 7])
    corrupted = torch.tensor([False, True, False, False, False, True])
    out = fresh_ids(ids, corrupted)
    clean = ~corrupted
    assert torch.equal(out[clean][:, None] == out[clean][None, :], ids[clean][:, None] == ids[clean][None, :])
    assert out[1] != out[5] and not torch.isin(out[corrupted], out[clean]).any()


def literal_off_diagonal_positives(ids) -> int:
    """Pairs (i, j), i != j, with equal ids, one pair at a time."""
    n = len(ids)
    return sum(1 for i in range(n) for j in range(n) if i != j and ids[i] == ids[j])


def test_off_diagonal_positives_by_hand_and_against_literal_count():
    # Groups of sizes 3 (id 3), 2 (id 5) and 1 (id 7): 3 * 2 + 2 * 1 ordered pairs.
    assert off_diagonal_positives(torch.tensor([3, 3, 5, 3, 7, 5])) == 8
    assert off_diagonal_positives(torch.arange(9)) == 0
    assert off_diagonal_positives(torch.full((9,), 4)) == 9 * 8
    ids = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(fresh_seed()))
    assert off_diagonal_positives(ids) == literal_off_diagonal_positives(ids.tolist())


def test_duplicates_per_batch_counts_positives_in_the_batches_a_trial_sees():
    from types import SimpleNamespace

    pool, batch, steps, seed = 30, 8, 5, fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    captions = torch.randint(0, 4, (pool, 1), generator=generator).repeat(1, 3)     # 4 distinct captions
    # Ids coarser than captions (two captions per id), as digits' class ids group its templates.
    data = SimpleNamespace(pixel_values=torch.zeros(pool, 1), input_ids=captions, positive_ids=captions[:, 0] // 2)
    by_id, by_caption = duplicates_per_batch(data, batch, steps, seed)
    batches = [batch_indices(step, batch, pool, seed) for step in range(steps)]
    want_id = sum(literal_off_diagonal_positives(data.positive_ids[index].tolist()) for index in batches) / steps
    want_caption = sum(literal_off_diagonal_positives(captions[index, 0].tolist()) for index in batches) / steps
    assert by_id == want_id and by_caption == want_caption and by_id >= by_caption


def test_count_spikes_on_a_made_up_curve():
    steps = 400
    base = (3.0 * torch.exp(-torch.arange(steps) / 80.0) + 0.5).tolist()
    noisy = [value * (1 + 0.02 * math.sin(step)) for step, value in enumerate(base)]
    assert count_spikes(noisy) == []
    spiked = list(noisy)
    starts = [60, 150, 151, 152, 300]               # a one-step spike, a three-step spike, another one-step spike
    for step in starts:
        spiked[step] *= 2.0
    assert count_spikes(spiked) == [60, 150, 300]
    assert largest_rise(spiked) > 0.8
    spiked[350] = math.inf                          # a non-finite loss is a spike too
    assert count_spikes(spiked) == [60, 150, 300, 350]


def test_batch_indices_cover_each_epoch_once():
    pool, batch = 48, 16
    seed = fresh_seed()
    first_epoch = torch.cat([batch_indices(step, batch, pool, seed) for step in range(pool // batch)])
    assert torch.equal(first_epoch.sort().values, torch.arange(pool))
    # Equal examples seen: positions [0, 96) in batches of 32 or of 16 are the same samples in the same order.
    big = torch.cat([batch_indices(step, 32, pool, seed) for step in range(3)])
    small = torch.cat([batch_indices(step, 16, pool, seed) for step in range(6)])
    assert torch.equal(big, small)


def test_compare_and_smooth():
    assert compare([0.9, 0.91, 0.92], [0.5, 0.51, 0.49])[2] == "higher"
    assert compare([0.5, 0.7, 0.6], [0.55, 0.65, 0.6])[2] == "within noise"
    assert compare([0.2], [0.4])[2].startswith("lower")
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_report_writer_writes_markdown_and_pngs(tmp_path):
    report = Report(
        study="made-up", title="A made-up study", claim="The paper says x.", verdict="We see y.",
        setup=["one line"],
        tables=[Table("numbers", ["a", "b"], [["1", "2"], ["3", "4"]], note="a note")],
        plots=[Plot("curve.png", "curve", "step", "loss", [Series("s", [0, 1, 2], [3.0, 2.0, 1.0], [0.1, 0.1, 0.1])]),
               Plot("bars.png", "bars", "", "acc", [Series("p", [0], [50.0], [2.0]), Series("q", [1], [60.0])],
                    bars=True)],
        smoke=True,
    )
    path = write_report(report, tmp_path / "out")
    text = path.read_text()
    assert "| a | b |" in text and "| 3 | 4 |" in text and "Smoke run" in text and "We see y." in text
    for name in ("curve.png", "bars.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_unknown_study_is_a_user_error(capsys):
    from siglip.cli import main

    assert main(["reproduce", "no-such-study"]) == 2
    assert "batch-size" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_smoke_run_writes_report(study, tmp_path):
    from siglip.cli import main

    out = tmp_path / study
    assert main(["reproduce", study, "--smoke", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Smoke run" in text and "## The paper's claim" in text and "## What we measured" in text
    assert re.search(r"^\|---", text, flags=re.MULTILINE), "the report must hold a table"
    images = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert images, "the report must show its plots"
    for name in images:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
