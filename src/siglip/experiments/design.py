"""The one description every study shares: what it trains (arms), what its claim predicts (comparisons), the world
it trains in (scale), and the paper's own figures to set beside ours.

A study module builds a `Study` from these and nothing else; `siglip.experiments.runner` trains every arm on every
seed, pairs the arms by seed, tests each comparison and writes the report. So a new study is a short file: its arms,
its comparisons, the paper's numbers, and (only if it needs one) an objective or a corruption of its own. A SigLIP 2
study, say, would add arms whose `objective` also trains a caption decoder (its `modules` hook hands the runner the
decoder's parameters) and compare them with the plain sigmoid arm.

Everything an arm holds is plain data (frozen dataclasses), so arms travel to worker processes; the study's
callables (its conditions, extra tables and plots) stay in the main process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from siglip.experiments.report import Plot, Table

HEADLINE = "zeroshot"
"""The headline metric: zero-shot accuracy on the held-out split, averaged over the source's tasks with headroom."""

SATURATED_TASKS = ("color",)
"""Tasks reported but kept out of the headline mean: `shapes` colour is solved (~100%) by almost every run, so
averaging it in would hide the differences a study looks for (issue 19)."""

LOCKED, SCRATCH = "locked", "scratch"


@dataclass(frozen=True)
class Scale:
    """The world every arm of a study trains in, and how much of it."""

    data: str = "shapes"
    """Default source of the arms (see `siglip.data.open_source`); an arm may name another."""
    preset: str = "tiny"
    """Model preset of `siglip.model.PRESETS`."""
    vocab_size: int = 256
    """Tokenizer vocabulary, trained on the source's captions once per seed."""
    max_text_length: int = 16
    corpus_size: int = 4096
    """Captions the tokenizer learns from."""
    pool_size: int = 8192
    """Training samples rendered once per seed and source; arms cycle through them in seeded epochs."""
    test_size: int = 1024
    """Held-out samples scored (at most; `shapes` has 600)."""


@dataclass(frozen=True)
class TowerSpec:
    """A supervised-pretrained image tower (LiT's and SigLiT's locked tower): how it is trained, which keys its cache.

    It is trained once on its own seed's pool (cosine-classifier heads on the source's labels) and cached as
    safetensors; every seed of every study with the same spec loads the same weights.
    """

    data: str = "shapes"
    preset: str = "tiny"
    seed: int = 1000
    """Its own seed: its pool is drawn apart from the trial seeds' pools."""
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    pool_size: int = 8192


@dataclass
class TrainBatch:
    """One batch of pre-rendered tensors, as a corruption sees and returns it."""

    pixel_values: torch.Tensor
    """(n, 3, S, S) float32, normalised by the processor."""
    input_ids: torch.Tensor
    """(n, L) int64."""
    positive_ids: torch.Tensor
    """(n,) int64."""


@dataclass
class StepInputs:
    """What an `Objective` sees at one step."""

    image_features: torch.Tensor
    """(n, d) L2-normalised."""
    text_features: torch.Tensor
    """(n, d) L2-normalised."""
    logit_scale: torch.Tensor
    """t, 0-d."""
    logit_bias: torch.Tensor
    """b, 0-d."""
    positive_ids: torch.Tensor | None
    """(n,) or None for diagonal labels."""
    generator: torch.Generator
    """The trial's own stream, for objectives that draw (e.g. random masking)."""
    batch: TrainBatch
    model: torch.nn.Module
    extra: torch.nn.Module | None
    """The objective's own trainable modules (`Objective.modules`), if any."""
    step: int
    """0-based index of the step."""


@dataclass
class TrialResult:
    """What one run of one arm on one seed measured."""

    arm: str
    seed: int
    metrics: dict[str, float]
    """Held-out metrics (see `evaluate`) and run summaries ("initial_loss", "final_loss", "logit_scale",
    "logit_bias", "duplicates_per_batch")."""
    chance: dict[str, float]
    """The same keys for a model that learned nothing (see `PreparedData.chance`)."""
    curves: dict[str, list[float]]
    """Per step: "loss" (before that step's update), "logit_scale", "logit_bias", "grad_norm"."""
    seconds: float
    diverged: bool
    order_digest: str
    """SHA-1 of the pool indices of every batch, in order: equal for arms that saw the same data in the same order."""
    load_average: float = math.nan
    """The machine's one-minute load average when the trial ended."""
    extra: dict = field(default_factory=dict)


class Objective:
    """A training objective that replaces an arm's plain loss (e.g. the sigmoid loss over a subset of pairs).

    Subclasses are frozen dataclasses, so arms stay picklable; `__call__` maps one step's features to a 0-d loss.
    """

    kept_negative_fraction: float = 1.0
    """Fraction of the batch's negatives the objective counts; the arm's prior bias follows it."""

    def modules(self, model) -> torch.nn.Module | None:
        """Extra trainable parts (a decoder, a head) built once per trial; their parameters join the optimiser."""
        return None

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        raise NotImplementedError


class Corruption:
    """A change to each training batch before the step (e.g. noisy images); subclasses are frozen dataclasses.

    It draws from its own generator, seeded by the trial's seed: two arms of one seed corrupt the same rows alike.
    """

    def __call__(self, batch: TrainBatch, data, generator: torch.Generator) -> TrainBatch:
        """`data` is the seed's `PreparedData` (vocabulary, special ids, pixel normalisation)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Arm:
    """One setting of a study: everything a training run needs beside its seed."""

    name: str
    """Row label in tables and the key comparisons name it by."""
    batch_size: int
    steps: int
    loss: str = "sigmoid"
    """"sigmoid" (SigLIP) or "softmax" (CLIP); `objective`, when given, replaces it."""
    init_logit_scale: float = 10.0
    """t at step 0, for both losses: a sigmoid-softmax comparison must not also compare temperatures."""
    init_logit_bias: float | None = None
    """b at step 0; None is the prior, -log(negatives per positive) (see `prior_logit_bias`)."""
    learn_logit_bias: bool = True
    """False keeps b where it starts (the paper's "no bias" row, with b = 0)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW (the paper's 1e-3)."""
    beta2: float = 0.95
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    """Linear warm-up over this fraction of the steps, then cosine decay to zero."""
    grad_clip: float | None = None
    """Global gradient-norm clip; None leaves gradients alone (the beta2 study must see spikes)."""
    positive_ids: bool = True
    """Pairs with equal `Sample.positive_id` are positives: the small worlds repeat captions within a batch."""
    image_tower: str = SCRATCH
    """"scratch" trains both towers; "locked" loads the study's pretrained tower, frozen, its features cached."""
    data: str | None = None
    """Source of this arm; None takes the study's `Scale.data`."""
    objective: Objective | None = None
    corruption: Corruption | None = None

    @property
    def examples(self) -> int:
        """Training examples this arm consumes: arms with equal counts see the same samples in the same order."""
        return self.batch_size * self.steps

    def logit_bias_at_start(self) -> float:
        if self.init_logit_bias is not None:
            return self.init_logit_bias
        fraction = self.objective.kept_negative_fraction if self.objective is not None else 1.0
        return prior_logit_bias(self.batch_size, fraction)


def prior_logit_bias(batch_size: int, kept_negative_fraction: float = 1.0) -> float:
    """b such that sigmoid(b) is the share of positives among a row's pairs: -log(negatives per positive).

    The paper's b = -10 is this prior at its batch (-log 32k = -10.4); at batch 128 it is -log 127 = -4.8. Adam moves
    b by about the learning rate per step, so a short run keeps b near where it starts: starting anywhere else
    makes the bias, not the loss, the thing compared.
    """
    negatives = max(kept_negative_fraction * (batch_size - 1), 1e-9)
    return -math.log(negatives) if negatives > 1 else 0.0


Results = Mapping[str, "list[TrialResult]"]
"""Arm name -> its trials, one per seed in the study's seed order."""


@dataclass(frozen=True)
class Comparison:
    """One claim tested by a paired difference over seeds: sum of `plus` arms minus sum of `minus` arms.

    "A beats B" is plus=(A,), minus=(B,). "Sigmoid degrades less than softmax" is a difference of differences:
    plus=(sigmoid noisy, softmax clean), minus=(sigmoid clean, softmax noisy). The claim predicts the difference is
    above -margin; the verdict reads the 95% interval of the per-seed differences (see `siglip.experiments.stats`).
    """

    claim: str
    plus: tuple[str, ...]
    minus: tuple[str, ...]
    metric: str = HEADLINE
    margin: float = 0.0
    """0: the claim is "greater"; m > 0: "not worse by more than m" (in the metric's units)."""
    must_learn: tuple[str, ...] | None = None
    """Arms whose headline must be above chance for the claim to be tested; None: every arm named."""
    condition: Callable[[Results], str | None] | None = None
    """Returns why the condition the claim is about was not reached (then "not tested"), or None."""
    predicted: bool = True
    """False: shown with its interval, but not a claim of the paper, so no verdict."""
    percent: bool = True
    """The metric is a fraction shown in points (x100); False shows it as it is (a count, a loss)."""

    @property
    def arms(self) -> tuple[str, ...]:
        return self.plus + self.minus


@dataclass(frozen=True)
class PaperFigure:
    """The paper's own numbers for a study, with where they come from."""

    source: str
    """Section, table or figure, and the setting (model, batch, examples seen)."""
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""
    plot: Plot | None = None
    """The paper's curve, drawn from the same numbers."""


@dataclass
class Study:
    """A study: its claim, the paper's figures, its arms and seeds, and the comparisons that test the claim."""

    name: str
    """Command name, e.g. "batch-size"."""
    title: str
    claim: str
    """The paper's claim in our words, with its section."""
    paper: list[PaperFigure]
    arms: list[Arm]
    comparisons: list[Comparison]
    scope: str
    """What this scale can and cannot test, plainly, and why."""
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    scale: Scale = field(default_factory=Scale)
    tower: TowerSpec | None = None
    """The pretrained image tower of the arms with image_tower "locked"."""
    setup: list[str] = field(default_factory=list)
    """Lines of the report's setup section beside the shared ones."""
    smoke: bool = False
    measures: Callable[[TrialResult], dict[str, float]] | None = None
    """Extra per-trial metrics from the trial's curves (e.g. loss spikes), computed before the comparisons."""
    tables: Callable[[Study, Results], list[Table]] | None = None
    """Tables beside the shared ones (arms, tasks, comparisons)."""
    plots: Callable[[Study, Results], list[Plot]] | None = None
    """Plots beside the shared bar chart of the headline metric."""

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(f"study {self.name!r} has no arm {name!r}; its arms: {[arm.name for arm in self.arms]}")
