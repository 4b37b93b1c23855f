"""siglip.experiments.prepared: the batch order shared by a seed's arms, chance levels, the held-out subset."""

from __future__ import annotations

import torch

from siglip.experiments.prepared import batch_indices, headline_tasks, mean_over_headline, spread_subset


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def test_batch_indices_cover_each_epoch_once_and_ignore_the_batch_size():
    pool, batch = 48, 16
    seed = fresh_seed()
    first_epoch = torch.cat([batch_indices(step, batch, pool, seed) for step in range(pool // batch)])
    assert torch.equal(first_epoch.sort().values, torch.arange(pool))
    # Equal examples seen: positions [0, 96) in batches of 32 or of 16 are the same samples in the same order.
    big = torch.cat([batch_indices(step, 32, pool, seed) for step in range(3)])
    small = torch.cat([batch_indices(step, 16, pool, seed) for step in range(6)])
    assert torch.equal(big, small)
    other = torch.cat([batch_indices(step, 16, pool, seed + 1) for step in range(6)])
    assert not torch.equal(small, other), "another seed draws another order"


def test_headline_leaves_out_saturated_colour():
    assert headline_tasks(["color", "shape", "count"]) == ["shape", "count"]
    assert headline_tasks(["digit"]) == ["digit"]
    assert headline_tasks(["color"]) == ["color"], "a source with nothing else keeps its one task"
    assert mean_over_headline({"color": 1.0, "shape": 0.5, "count": 0.25}) == 0.375


def test_spread_subset_keeps_every_part_of_an_ordered_list():
    items = [("a", index) for index in range(30)] + [("b", index) for index in range(30)]
    subset = spread_subset(items, 10)
    assert len(subset) == 10 and {kind for kind, _ in subset} == {"a", "b"}
    assert spread_subset(items[:5], 10) == items[:5]


def literal_retrieval_chance(captions: list[tuple]) -> float:
    """Mean over images of (captions identical to its own) / (all captions), one image at a time."""
    return sum(sum(other == mine for other in captions) for mine in captions) / len(captions) ** 2


def test_retrieval_chance_counts_identical_captions_as_matches():
    from siglip.experiments.prepared import PreparedData

    ids = torch.randint(0, 3, (40, 2))                          # few distinct captions: many identical ones
    data = PreparedData.__new__(PreparedData)
    data.tasks, data.test_input_ids = {"color": ["a"] * 8, "shape": ["b"] * 6, "count": ["c"] * 3}, ids
    chance = data.chance()
    assert abs(chance["i2t_r1"] - literal_retrieval_chance([tuple(row) for row in ids.tolist()])) < 1e-12
    assert chance["t2i_r1"] == chance["i2t_r1"]
    assert chance["zeroshot/color"] == 1 / 8 and abs(chance["zeroshot"] - (1 / 6 + 1 / 3) / 2) < 1e-12
