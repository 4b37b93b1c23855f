"""A source rendered and tokenised once per seed, and the order in which arms draw batches from it.

The production loop streams samples; a study instead renders `Scale.pool_size` training samples and the held-out
split once per (source, seed), tokenises them with a tokenizer trained on that seed's captions, and lets every arm
of the seed index the same tensors. `batch_indices` makes the order a function of the seed alone, so two arms of
one seed that consume the same number of examples see the same samples in the same order, whatever their batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from siglip.experiments.design import SATURATED_TASKS, Scale


@dataclass
class PreparedData:
    """A source rendered and tokenised once, shared by every arm of one seed."""

    name: str
    tasks: dict[str, list[str]]
    """Zero-shot task -> its class names."""
    pixel_values: torch.Tensor
    """(N, 3, S, S) float32 training images, normalised as the processor does."""
    input_ids: torch.Tensor
    """(N, L) int64 training captions, left-padded to the full length."""
    positive_ids: torch.Tensor
    """(N,) int64: image i and text j are a positive pair when their ids are equal."""
    labels: torch.Tensor
    """(N, T) int64 class index per task in `tasks` order, -1 where a sample has no label."""
    test_pixel_values: torch.Tensor
    test_input_ids: torch.Tensor
    test_labels: torch.Tensor
    """(M, T) int64."""
    class_input_ids: dict[str, torch.Tensor]
    """task -> (K * P, L) int64: every class name in every template, class-major."""
    templates_per_task: dict[str, int]
    vocab_size: int
    special_ids: torch.Tensor
    """Ids the tokenizer reserves (pad, end, unknown): corruptions keep them in place."""
    pixel_mean: torch.Tensor
    """(3,) the processor's normalisation, to make noise images in the same pixel space."""
    pixel_std: torch.Tensor
    image_size: int
    max_text_length: int

    @property
    def pool(self) -> int:
        return self.pixel_values.shape[0]

    def chance(self) -> dict[str, float]:
        """The metrics a model that has learned nothing scores, keyed like `trial.evaluate`'s metrics.

        Zero-shot: 1/K per task, and the mean over the headline tasks. Retrieval R@1 among the held-out captions,
        identical captions counting as one another's match: a caption drawn at random is a match for image i with
        probability |G(i)| / M (G(i): the captions identical to i's), so chance is the mean of |G(i)| / M, the same
        for text-to-image.
        """
        chance = {f"zeroshot/{task}": 1.0 / len(names) for task, names in self.tasks.items()}
        chance["zeroshot"] = mean_over_headline({task: chance[f"zeroshot/{task}"] for task in self.tasks})
        _, groups, counts = self.test_input_ids.unique(dim=0, return_inverse=True, return_counts=True)
        retrieval = float(counts[groups].double().mean()) / self.test_input_ids.shape[0]
        chance["i2t_r1"] = chance["t2i_r1"] = retrieval
        return chance


def headline_tasks(tasks: list[str]) -> list[str]:
    """The tasks averaged into the headline metric: all but the saturated ones (all, if nothing else is left)."""
    kept = [task for task in tasks if task not in SATURATED_TASKS]
    return kept or list(tasks)


def mean_over_headline(per_task: dict[str, float]) -> float:
    """Mean of a per-task value over `headline_tasks`."""
    tasks = headline_tasks(list(per_task))
    return sum(per_task[task] for task in tasks) / len(tasks)


def prepare_data(scale: Scale, seed: int, *, source_name: str | None = None, with_test: bool = True) -> PreparedData:
    """Render `scale.pool_size` training samples and the held-out split of a source once, tokenised and normalised.

    Args:
        scale: sizes of the world (pool, tokenizer, model preset for the image size).
        seed: the source's seed: each seed draws its own training samples and trains its own tokenizer.
        source_name: a source other than `scale.data`.
        with_test: False skips the held-out split (its tensors are empty): for pretraining, which scores nothing.
    """
    from siglip.data import open_source
    from siglip.model import PRESETS
    from siglip.prompts import fill
    from siglip.tokenizer import build_processor, image_transform, text_transform, train_tokenizer

    spec = source_name or scale.data
    image_size = PRESETS[scale.preset].image_size
    source = open_source(spec, split="train", seed=seed, image_size=image_size)
    tokenizer = train_tokenizer(source.caption_corpus(scale.corpus_size), vocab_size=scale.vocab_size,
                                max_length=scale.max_text_length, seed=seed)
    processor = build_processor(tokenizer, image_size=image_size)
    to_pixels, to_ids = image_transform(processor), text_transform(processor)

    available = source.size                    # None for an endless procedural source
    count = scale.pool_size if available is None else min(scale.pool_size, available)
    train = [source.train_sample(index) for index in range(count)]
    test = spread_subset(source.test_samples(), scale.test_size) if with_test else []
    task_names = list(source.tasks)

    def stack(samples):
        if not samples:
            return (torch.empty(0, 3, image_size, image_size), torch.empty(0, scale.max_text_length, dtype=torch.long),
                    torch.empty(0, len(task_names), dtype=torch.long))
        pixels = torch.stack([to_pixels(sample.image) for sample in samples]).float()
        ids = torch.stack([torch.as_tensor(to_ids(sample.caption)) for sample in samples]).long()
        labels = torch.tensor([[sample.labels.get(task, -1) for task in task_names] for sample in samples],
                              dtype=torch.long).reshape(len(samples), len(task_names))
        return pixels, ids, labels

    pixels, ids, labels = stack(train)
    test_pixels, test_ids, test_labels = stack(test)
    class_ids, templates_per_task = {}, {}
    for task, names in source.tasks.items():
        templates = source.templates[task]
        prompts = [prompt for name in names for prompt in fill(templates, name)]
        class_ids[task] = torch.stack([torch.as_tensor(to_ids(prompt)) for prompt in prompts]).long()
        templates_per_task[task] = len(templates)
    image_processor = processor.image_processor
    return PreparedData(
        name=source.name, tasks=dict(source.tasks), pixel_values=pixels, input_ids=ids,
        positive_ids=torch.tensor([sample.positive_id for sample in train], dtype=torch.long), labels=labels,
        test_pixel_values=test_pixels, test_input_ids=test_ids, test_labels=test_labels, class_input_ids=class_ids,
        templates_per_task=templates_per_task, vocab_size=len(tokenizer),
        special_ids=torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long),
        pixel_mean=torch.tensor(image_processor.image_mean, dtype=torch.float32),
        pixel_std=torch.tensor(image_processor.image_std, dtype=torch.float32),
        image_size=pixels.shape[-1], max_text_length=ids.shape[1],
    )


def spread_subset(items: list, count: int) -> list:
    """At most `count` items, evenly spaced over the list, so a held-out split ordered by task keeps every task."""
    if len(items) <= count:
        return list(items)
    return [items[position * len(items) // count] for position in range(count)]


def batch_indices(step: int, batch_size: int, pool: int, seed: int) -> torch.Tensor:
    """Pool indices of batch `step`: positions [step*B, (step+1)*B) of a seeded permutation of the pool per epoch.

    Returns:
        (batch_size,) int64. The stream of positions depends on the seed alone, so arms that consume equal numbers
        of examples see the same samples in the same order, whatever their batch size.
    """
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // pool
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(pool, generator=generator)
        chosen = epochs == epoch
        out[chosen] = order[positions[chosen] % pool]
    return out
