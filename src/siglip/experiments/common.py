"""The lean in-memory trial runner every study shares.

The production loop (`siglip.train`) streams data, checkpoints and logs; a study instead needs hundreds of short,
cheap trials and hooks the production loop does not expose (a masked loss, corrupted pairs, a frozen image tower).
So a study renders and tokenises its data once (`prepare_data`), then runs each `Trial` on those tensors: build the
model (`siglip.model`), step AdamW under warm-up and cosine decay, and score the result with `siglip.evaluate`'s pure
metrics. A trial returns its per-step losses, t and b, and final zero-shot accuracy and retrieval R@1.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from siglip.experiments.report import Table, format_mean, mean_and_spread

# A loss hook: (image_features (n, d), text_features (n, d), t, b, positive_ids (n,) or None, generator) -> 0-d loss.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Generator],
                  torch.Tensor]


@dataclass
class TrainBatch:
    """One batch of pre-rendered tensors, as a corruption hook sees and returns it."""

    pixel_values: torch.Tensor
    """(n, 3, S, S) float32, already normalised by the processor."""
    input_ids: torch.Tensor
    """(n, L) int64, padded to the tokenizer's full length."""
    positive_ids: torch.Tensor
    """(n,) int64; image i and text j form a positive pair when their ids are equal."""


# A corruption hook: (batch, step, generator) -> batch of the same shapes.
CorruptFn = Callable[[TrainBatch, int, torch.Generator], TrainBatch]


@dataclass
class StudyConfig:
    """What every study shares; each study subclasses it with its own fields and returns one from `default_config`."""

    smoke: bool = False
    """A tiny run of the same code path (one seed, a few steps, small data): checks, not findings."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One trial per seed and setting; tables give mean ± standard deviation over them."""
    data: str = "shapes"
    """The source (see `siglip.data.open_source`)."""
    preset: str = "tiny"
    """Model preset of `siglip.model.PRESETS`."""
    image_size: int | None = None
    """Image side in pixels; None takes the preset's."""
    vocab_size: int = 256
    """Tokenizer vocabulary trained on the source's captions."""
    max_text_length: int = 16
    """Tokens per caption, padded to the full length (the text tower pools the last token)."""
    corpus_size: int = 4096
    """Training captions the tokenizer learns from (shapes renders an image per caption, so smoke runs use few)."""
    pool_size: int = 8192
    """Training samples rendered once per seed; trials cycle through them in seeded epochs."""
    test_size: int = 1024
    """Held-out samples scored at the end of each trial (at most; the source may hold fewer)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW (NOTES.md: 1e-3 learns the tiny model; 3e-3 collapses shapes)."""
    weight_decay: float = 1e-4
    """Decoupled weight decay on matrices only (not on norms, biases, t' or b)."""
    threads: int = 1
    """torch intra-op threads while the study runs. One by default: on a shared 2-core machine two threads that
    wait on each other's barriers ran a step up to 10x slower than one thread (measured beside other jobs)."""
    out: str = ""
    """Report directory; empty means reports/STUDY."""
    command: str = ""
    """The command line that ran the study, written into the report so it can be reproduced."""


@dataclass
class Trial:
    """One training run of a study."""

    name: str
    """Row label in tables and logs."""
    batch_size: int
    steps: int
    seed: int = 0
    loss: str = "sigmoid"
    """"sigmoid" (SigLIP) or "softmax" (CLIP); ignored when `loss_fn` is given."""
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    """Linear warm-up over this fraction of steps, then cosine decay to zero."""
    grad_clip: float | None = None
    """Global gradient-norm clip; None leaves gradients alone (so the beta2 study can see spikes)."""
    init_logit_scale: float = 10.0
    """t at step 0 (the model stores t' = log t)."""
    init_logit_bias: float | None = None
    """b at step 0; None means -log(batch_size), the paper's prior-matching -10 (about -log 32k) at our batch."""
    use_positive_ids: bool = True
    """Count pairs with equal `Sample.positive_id` as positives: the small worlds repeat captions within a batch."""
    loss_fn: LossFn | None = None
    corrupt: CorruptFn | None = None
    vision_state: dict[str, torch.Tensor] | None = None
    """Initial weights of `model.vision_model` (e.g. a pretrained image tower)."""
    lock_image: bool = False
    """Freeze the image tower (LiT): no gradients, no optimiser state for it."""


@dataclass
class TrialResult:
    """What one trial measured."""

    trial: Trial
    losses: list[float]
    """Training loss at each step (before that step's update)."""
    logit_scales: list[float]
    logit_biases: list[float]
    metrics: dict[str, float]
    """"accuracy" (mean zero-shot accuracy over tasks), "accuracy/TASK", "i2t_r1", "t2i_r1"; NaN if diverged."""
    seconds: float
    diverged: bool = False


@dataclass
class PreparedData:
    """A source rendered and tokenised once, shared by every trial of one seed."""

    name: str
    tasks: dict[str, list[str]]
    pixel_values: torch.Tensor
    """(N, 3, S, S) float32 training images."""
    input_ids: torch.Tensor
    """(N, L) int64 training captions."""
    positive_ids: torch.Tensor
    """(N,) int64."""
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
    model_kwargs: dict = field(default_factory=dict)


def log(message: str) -> None:
    """Progress on stderr, so long full runs show where they are."""
    print(message, file=sys.stderr, flush=True)


def prepare_data(config: StudyConfig, seed: int, *, spec: str | None = None) -> PreparedData:
    """Render `config.pool_size` training samples and the held-out split of a source once, tokenised and normalised.

    Args:
        config: the study's config (data, sizes, tokenizer).
        seed: the source's seed (each trial seed gets its own draw of the data).
        spec: a source other than `config.data`.
    """
    from siglip.data import open_source
    from siglip.model import PRESETS
    from siglip.prompts import fill
    from siglip.tokenizer import build_processor, image_transform, text_transform, train_tokenizer

    spec = spec or config.data
    image_size = config.image_size or getattr(PRESETS[config.preset], "image_size", None)
    source = open_source(spec, split="train", seed=seed, image_size=image_size)
    tokenizer = train_tokenizer(
        source.caption_corpus(config.corpus_size), vocab_size=config.vocab_size,
        max_length=config.max_text_length, seed=seed,
    )
    processor = build_processor(tokenizer, image_size=image_size)
    to_pixels, to_ids = image_transform(processor), text_transform(processor)

    available = source.size                    # None for an endless procedural source
    count = config.pool_size if available is None else min(config.pool_size, available)
    train = [source.train_sample(index) for index in range(count)]
    test = spread_subset(source.test_samples(), config.test_size)
    task_names = list(source.tasks)

    def stack(samples):
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
        name=source.name,
        tasks=dict(source.tasks),
        pixel_values=pixels,
        input_ids=ids,
        positive_ids=torch.tensor([sample.positive_id for sample in train], dtype=torch.long),
        labels=labels,
        test_pixel_values=test_pixels,
        test_input_ids=test_ids,
        test_labels=test_labels,
        class_input_ids=class_ids,
        templates_per_task=templates_per_task,
        vocab_size=len(tokenizer),
        special_ids=torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long),
        pixel_mean=torch.tensor(image_processor.image_mean, dtype=torch.float32),
        pixel_std=torch.tensor(image_processor.image_std, dtype=torch.float32),
        image_size=pixels.shape[-1],
        max_text_length=ids.shape[1],
    )


def spread_subset(items: list, count: int) -> list:
    """At most `count` items, evenly spaced over the list, so a held-out split ordered by task keeps every task."""
    if len(items) <= count:
        return list(items)
    return [items[position * len(items) // count] for position in range(count)]


def batch_indices(step: int, batch_size: int, pool: int, seed: int) -> torch.Tensor:
    """Pool indices of global batch `step`: positions [step*B, (step+1)*B) of a seeded permutation per epoch.

    Returns:
        (batch_size,) int64. Equal examples seen means equal positions consumed, whatever the batch size.
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


def build_trial_model(trial: Trial, data: PreparedData, config: StudyConfig):
    """A fresh model for `trial`, its weights drawn from the trial's seed without touching the global RNG."""
    from siglip.model import build_model

    bias = -math.log(trial.batch_size) if trial.init_logit_bias is None else trial.init_logit_bias
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(trial.seed)
        model = build_model(
            config.preset, vocab_size=data.vocab_size, max_text_length=data.max_text_length,
            image_size=data.image_size, init_logit_scale=trial.init_logit_scale, init_logit_bias=bias,
        )
    if trial.vision_state is not None:
        model.vision_model.load_state_dict(trial.vision_state)
    if trial.lock_image:
        model.vision_model.requires_grad_(False)
    return model


def default_loss(trial: Trial) -> LossFn:
    """The production losses of `siglip.loss` as a loss hook."""
    from siglip.loss import sigmoid_loss, softmax_loss

    if trial.loss == "sigmoid":
        return lambda images, texts, scale, bias, ids, generator: sigmoid_loss(images, texts, scale, bias,
                                                                              positive_ids=ids)
    if trial.loss == "softmax":
        return lambda images, texts, scale, bias, ids, generator: softmax_loss(images, texts, scale, positive_ids=ids)
    raise ValueError(f"trial.loss must be 'sigmoid' or 'softmax', got {trial.loss!r}")


def run_trial(trial: Trial, data: PreparedData, config: StudyConfig) -> TrialResult:
    """Train one model on `data` as `trial` says and score it on the held-out split.

    A trial that reaches a non-finite loss stops there and reports NaN metrics (tables show "diverged").
    """
    from siglip.model import encode_images, encode_texts, scale_and_bias
    from siglip.optim import build_optimizer

    started = time.perf_counter()
    model = build_trial_model(trial, data, config)
    model.train()
    optimizer, schedule = build_optimizer(
        model, lr=trial.lr, weight_decay=trial.weight_decay, beta1=trial.beta1, beta2=trial.beta2,
        warmup_steps=max(1, round(trial.warmup_fraction * trial.steps)), total_steps=trial.steps,
    )
    loss_fn = trial.loss_fn or default_loss(trial)
    generator = torch.Generator().manual_seed(trial.seed)
    pool = data.pixel_values.shape[0]
    losses, scales, biases = [], [], []
    diverged = False
    for step in range(trial.steps):
        index = batch_indices(step, trial.batch_size, pool, trial.seed)
        batch = TrainBatch(data.pixel_values[index], data.input_ids[index], data.positive_ids[index])
        if trial.corrupt is not None:
            batch = trial.corrupt(batch, step, generator)
        if trial.lock_image:
            with torch.no_grad():
                image_features = encode_images(model, batch.pixel_values)
        else:
            image_features = encode_images(model, batch.pixel_values)
        text_features = encode_texts(model, batch.input_ids)
        scale, bias = scale_and_bias(model)
        ids = batch.positive_ids if trial.use_positive_ids else None
        loss = loss_fn(image_features, text_features, scale, bias, ids, generator)
        value = float(loss.detach())
        losses.append(value)
        scales.append(float(scale.detach()))
        biases.append(float(bias.detach()))
        if not math.isfinite(value):
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trial.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), trial.grad_clip)
        optimizer.step()
        schedule.step()
    if diverged:
        metrics = {"accuracy": math.nan, "i2t_r1": math.nan, "t2i_r1": math.nan}
    else:
        metrics = evaluate_model(model, data)
    result = TrialResult(trial, losses, scales, biases, metrics, time.perf_counter() - started, diverged)
    log(f"  {trial.name} seed {trial.seed}: {len(losses)} steps x {trial.batch_size} in {result.seconds:.1f} s, "
        f"loss {losses[-1]:.3f}, accuracy {metrics['accuracy']:.3f}, i2t R@1 {metrics['i2t_r1']:.3f}")
    return result


@torch.no_grad()
def embed(encode: Callable, model, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encode (n, ...) inputs in chunks; returns (n, d) L2-normalised embeddings."""
    return torch.cat([encode(model, inputs[start:start + batch_size]) for start in range(0, inputs.shape[0],
                                                                                         batch_size)])


@torch.no_grad()
def evaluate_model(model, data: PreparedData) -> dict[str, float]:
    """Zero-shot accuracy per task (and their mean) and retrieval R@1 on the held-out split."""
    from siglip.evaluate import retrieval_recall, zeroshot_accuracy
    from siglip.model import encode_images, encode_texts

    model.eval()
    image_features = embed(encode_images, model, data.test_pixel_values)          # (M, d)
    metrics: dict[str, float] = {}
    accuracies = []
    for column, (task, names) in enumerate(data.tasks.items()):
        prompts = embed(encode_texts, model, data.class_input_ids[task])         # (K * P, d)
        # Prompt ensembling as in CLIP: mean of the templates' embeddings, renormalised.
        class_features = F.normalize(prompts.view(len(names), data.templates_per_task[task], -1).mean(1), dim=-1)
        labels = data.test_labels[:, column]
        known = labels >= 0
        if not bool(known.any()):
            continue                       # no held-out sample carries this task's label
        accuracy = float(zeroshot_accuracy(image_features[known], class_features, labels[known]))
        metrics[f"accuracy/{task}"] = accuracy
        metrics[f"chance/{task}"] = 1.0 / len(names)
        accuracies.append(accuracy)
    metrics["accuracy"] = sum(accuracies) / len(accuracies) if accuracies else math.nan
    text_features = embed(encode_texts, model, data.test_input_ids)
    # Identical captions embed identically: either one is a correct answer (as `siglip eval` counts it).
    groups = data.test_input_ids.unique(dim=0, return_inverse=True)[1]
    recall = retrieval_recall(image_features, text_features, ks=(1,), groups=groups)
    metrics["i2t_r1"], metrics["t2i_r1"] = _recall_at_1(recall)
    model.train()
    return metrics


def _recall_at_1(recall: dict[str, float]) -> tuple[float, float]:
    """Image-to-text and text-to-image R@1 out of `retrieval_recall`'s dict (its contract keys)."""
    return float(recall["image_to_text_r1"]), float(recall["text_to_image_r1"])


def values(results: list[TrialResult], key: str) -> list[float]:
    """One metric across trials (usually one per seed)."""
    return [result.metrics.get(key, math.nan) for result in results]


def per_task_table(title: str, results: dict[str, list[TrialResult]]) -> Table:
    """Zero-shot accuracy of every task (columns) for every setting (rows), with chance in the header."""
    tasks: dict[str, float] = {}
    for runs in results.values():
        for run in runs:
            for key, value in run.metrics.items():
                if key.startswith("chance/"):
                    tasks.setdefault(key.split("/", 1)[1], value)
    columns = ["setting", *(f"{task} % (chance {100 * chance:.0f})" for task, chance in tasks.items())]
    rows = [[label, *(format_mean(values(runs, f"accuracy/{task}"), percent=True) for task in tasks)]
            for label, runs in results.items()]
    return Table(title, columns, rows, note="Zero-shot accuracy per task on the held-out split; mean ± standard "
                                            "deviation over seeds.")


def mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Step-wise mean and standard deviation of several curves, cut to the shortest."""
    length = min(len(curve) for curve in curves)
    stacked = torch.tensor([curve[:length] for curve in curves], dtype=torch.float64)
    spread = stacked.std(0) if len(curves) > 1 else torch.zeros(length, dtype=torch.float64)
    return stacked.mean(0).tolist(), spread.tolist()


def smooth(curve: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` steps (shorter at the start), for readable loss plots."""
    if window <= 1:
        return list(curve)
    tensor = torch.tensor(curve, dtype=torch.float64)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), tensor.cumsum(0)])
    steps = torch.arange(1, len(curve) + 1)
    starts = (steps - window).clamp_min(0)
    return ((cumulative[steps] - cumulative[starts]) / (steps - starts)).tolist()


def compare(first: list[float], second: list[float]) -> tuple[float, float, str]:
    """How `first` stands against `second` over seeds: (difference of means, its standard error, a word).

    The word is "higher" or "lower" when the difference exceeds twice its standard error, else "within noise";
    with a single seed per side there is no spread, and the word says so ("higher (1 seed)").
    """
    mean_first, spread_first = mean_and_spread(first)
    mean_second, spread_second = mean_and_spread(second)
    difference = mean_first - mean_second
    if math.isnan(difference):
        return difference, math.nan, "not comparable (a run diverged)"
    if len(first) < 2 or len(second) < 2:
        word = "higher" if difference > 0 else "lower" if difference < 0 else "equal"
        return difference, math.nan, f"{word} (1 seed, no spread)"
    error = math.sqrt(spread_first**2 / len(first) + spread_second**2 / len(second))
    if abs(difference) > 2 * error:
        return difference, error, "higher" if difference > 0 else "lower"
    return difference, error, "within noise"


def setup_lines(config: StudyConfig, *details: str) -> list[str]:
    """The setup section every report shares, then the study's own `details`."""
    return [
        f"Command: `{config.command or 'siglip reproduce'}`",
        f"Data: `{config.data}` ({config.pool_size} training samples rendered per seed, cycled in seeded epochs; "
        f"up to {config.test_size} held-out samples scored)",
        f"Model: preset `{config.preset}`, tokenizer of {config.vocab_size} tokens, captions padded to "
        f"{config.max_text_length} tokens",
        f"Optimiser: AdamW, peak lr {config.lr:g}, weight decay {config.weight_decay:g} on matrices, 10% linear "
        "warm-up then cosine decay, no gradient clipping",
        f"Seeds: {', '.join(str(seed) for seed in config.seeds)} (model weights, data draw and batch order); "
        f"{config.threads} torch thread(s)",
        "Zero-shot accuracy: held-out split, prompt-ensembled class embeddings, mean over the source's tasks; "
        "R@1: image-to-text retrieval among the held-out captions",
        *details,
    ]
