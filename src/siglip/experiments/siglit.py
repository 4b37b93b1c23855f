"""Study 6: SigLiT, a text tower trained against a frozen pretrained image tower (the paper's SigLiT, after LiT).

The image tower is first pretrained here with supervision: a linear head per zero-shot task (shapes: colour and
shape; digits: the digit) on its L2-normalised embedding, cross-entropy on the training pool's labels. It is then
frozen and a fresh text tower is trained against it with the sigmoid loss. The baseline trains both towers from
scratch with the same loss for as many steps as pretraining and SigLiT together, at the same batch: equal examples
through the image tower. Wall time is reported beside accuracy, since a frozen tower costs less per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from siglip.experiments.common import (
    PreparedData,
    StudyConfig,
    Trial,
    batch_indices,
    build_trial_model,
    compare,
    log,
    per_task_table,
    prepare_data,
    run_trial,
    setup_lines,
    values,
)
from siglip.experiments.report import Plot, Report, Series, Table, format_mean, mean_and_spread

CLAIM = (
    "Zhai et al. (2023), SigLiT, after LiT (Zhai et al., 2022): with a frozen, pretrained image tower, a "
    "text tower trained with the sigmoid loss (SigLiT) reaches good zero-shot accuracy cheaply, far better than "
    "training both towers from scratch for the same compute."
)

HEAD_SCALE = 10.0
"""Fixed logit scale of the supervised heads on unit-norm embeddings (cosine classifier)."""


def pretrain_image_tower(
    data: PreparedData, config: StudyConfig, *, seed: int, steps: int, batch_size: int
) -> tuple[dict[str, torch.Tensor], float, float]:
    """Supervised pretraining of an image tower on the pool's labels, one linear head per task.

    Returns:
        The vision tower's state dict, its training accuracy over the last tenth of the steps (mean over tasks),
        and the seconds it took.
    """
    from siglip.model import encode_images
    from siglip.optim import build_optimizer

    started = time.perf_counter()
    probe = Trial(name="pretrain", batch_size=batch_size, steps=steps, seed=seed)
    model = build_trial_model(probe, data, config)
    tower = model.vision_model
    width = encode_images(model, data.pixel_values[:2]).shape[1]
    generator = torch.Generator().manual_seed(seed)
    heads = torch.nn.ModuleList(
        torch.nn.Linear(width, len(names), bias=False) for names in data.tasks.values()
    )
    for head in heads:
        torch.nn.init.normal_(head.weight, std=width**-0.5, generator=generator)
    trained = torch.nn.ModuleDict({"tower": tower, "heads": heads})
    optimizer, schedule = build_optimizer(trained, lr=config.lr, weight_decay=config.weight_decay, beta2=0.95,
                                          warmup_steps=max(1, round(0.1 * steps)), total_steps=steps)
    correct, seen = 0, 0
    pool = data.pixel_values.shape[0]
    for step in range(steps):
        index = batch_indices(step, batch_size, pool, seed)
        features = encode_images(model, data.pixel_values[index])                # (n, d), unit norm
        labels = data.labels[index]                                             # (n, T)
        loss = torch.zeros(())
        for column, head in enumerate(heads):
            known = labels[:, column] >= 0
            logits = HEAD_SCALE * F.linear(features[known], F.normalize(head.weight, dim=1))
            loss = loss + F.cross_entropy(logits, labels[known, column])
            if step >= steps - max(1, steps // 10):
                correct += int((logits.argmax(1) == labels[known, column]).sum())
                seen += int(known.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    state = {name: value.detach().clone() for name, value in tower.state_dict().items()}
    return state, correct / max(1, seen), time.perf_counter() - started


@dataclass
class SigLiTConfig(StudyConfig):
    sources: tuple[str, ...] = ("shapes", "digits")
    """Sources run one after the other; each gets its own table."""
    batch_size: int = 128
    pretrain_steps: int = 150
    lit_steps: int = 150


def default_config(smoke: bool) -> SigLiTConfig:
    if smoke:
        return SigLiTConfig(
            smoke=True, corpus_size=256, seeds=(0,), sources=("shapes",), batch_size=16, pretrain_steps=2,
            lit_steps=2, pool_size=64, test_size=64,
        )
    return SigLiTConfig(seeds=(0, 1))


def run(config: SigLiTConfig) -> Report:
    scratch_steps = config.pretrain_steps + config.lit_steps
    tables, plots, verdicts = [], [], []
    for spec in config.sources:
        results = {"SigLiT (frozen pretrained image tower)": [], "from scratch, both towers": []}
        pretrain_accuracy, pretrain_seconds = [], []
        for seed in config.seeds:
            data = prepare_data(config, seed, spec=spec)
            log(f"siglit: {spec}, pretraining the image tower for {config.pretrain_steps} steps")
            state, accuracy, seconds = pretrain_image_tower(data, config, seed=seed, steps=config.pretrain_steps,
                                                            batch_size=config.batch_size)
            pretrain_accuracy.append(accuracy)
            pretrain_seconds.append(seconds)
            lit = Trial(name="SigLiT", batch_size=config.batch_size, steps=config.lit_steps, seed=seed, lr=config.lr,
                        weight_decay=config.weight_decay, vision_state=state, lock_image=True)
            scratch = Trial(name="scratch", batch_size=config.batch_size, steps=scratch_steps, seed=seed,
                            lr=config.lr, weight_decay=config.weight_decay)
            for label, trial in zip(results, (lit, scratch), strict=True):
                results[label].append(run_trial(trial, data, config))
        lit_label, scratch_label = list(results)
        rows = [
            [lit_label, f"{config.pretrain_steps} supervised + {config.lit_steps} contrastive",
             format_mean([p + r.seconds for p, r in zip(pretrain_seconds, results[lit_label], strict=True)], digits=0),
             format_mean(values(results[lit_label], "accuracy"), percent=True),
             format_mean(values(results[lit_label], "i2t_r1"), percent=True)],
            [scratch_label, f"{scratch_steps} contrastive",
             format_mean([r.seconds for r in results[scratch_label]], digits=0),
             format_mean(values(results[scratch_label], "accuracy"), percent=True),
             format_mean(values(results[scratch_label], "i2t_r1"), percent=True)],
        ]
        tables.append(per_task_table(f"{spec}: zero-shot accuracy by task", results))
        tables.insert(len(tables) - 1, Table(
            f"{spec}: frozen pretrained image tower vs from scratch", ["run", "steps", "seconds", "zero-shot %",
                                                                      "R@1 %"], rows,
            note=f"Batch {config.batch_size}; the image tower's supervised training accuracy at the end of "
                 f"pretraining: {format_mean(pretrain_accuracy, percent=True)}%. Mean ± standard deviation over "
                 f"{len(config.seeds)} seed(s); seconds include pretraining for SigLiT.",
        ))
        series = []
        for label, runs in results.items():
            mean = [100 * mean_and_spread(values(runs, "accuracy"))[0]]
            spread = [100 * mean_and_spread(values(runs, "accuracy"))[1]]
            series.append(Series(label, [0], mean, spread))
        plots.append(Plot(f"{spec}_accuracy.png", f"{spec}: zero-shot accuracy", "", "zero-shot accuracy (%)",
                          series, bars=True))
        difference, _, word = compare(values(results[lit_label], "accuracy"), values(results[scratch_label],
                                                                                     "accuracy"))
        verdicts.append((spec, difference, word))
    return Report(
        study="siglit",
        title="SigLiT: a frozen pretrained image tower vs both towers from scratch",
        claim=CLAIM,
        verdict=_verdict(verdicts),
        setup=setup_lines(config, f"Sources: {', '.join(config.sources)}; sigmoid loss (t = 10, b = -log batch); "
                                  f"image tower pretrained with cosine-classifier heads (scale {HEAD_SCALE:g}) for "
                                  f"{config.pretrain_steps} steps, then frozen for {config.lit_steps} SigLiT steps; "
                                  f"scratch runs {scratch_steps} steps at the same batch"),
        tables=tables,
        plots=plots,
        smoke=config.smoke,
    )


def _verdict(verdicts: list[tuple[str, float, str]]) -> str:
    lines = [f"- {spec}: SigLiT minus scratch zero-shot accuracy {100 * difference:+.1f} points ({word})."
             for spec, difference, word in verdicts]
    ahead = [spec for spec, _, word in verdicts if word.startswith("higher")]
    if len(ahead) == len(verdicts):
        summary = "Agrees with the paper at this scale: SigLiT beats training both towers from scratch."
    elif ahead:
        summary = f"Partly agrees: SigLiT is ahead on {', '.join(ahead)} only."
    else:
        summary = "Does not reproduce at this scale: SigLiT is not ahead of training from scratch."
    return "\n".join([summary, "", *lines])
