"""Study: the SigLIP 2 recipe (Tschannen et al., 2025) at small scale: SigLIP, SigLIP + the LocCa decoder, and the full
recipe (+ self-distillation and masked prediction over the last 20%), trained by `siglip train` itself.

Unlike the other studies, whose trials run an in-memory loop over a pre-rendered pool (siglip.experiments.trial),
every trial here is a `siglip train` run: the recipe lives in the production loop (its teacher, its crops, its decoder
targets drawn from the shapes world's regions), and that loop is what this study grades. So the module brings its own
`run_trials`: each seed's arms train one after the other in a worker process, each on the stream of its seed (the
same samples in the same order for every arm, the towers initialised alike), then are scored on the held-out split:
zero-shot and retrieval (siglip.evaluate), the dense probe and the trained decoder's referring accuracy
(siglip.siglip2.dense_eval), and the paper's referring protocol, a new decoder trained on the frozen tower
(siglip.siglip2.referring_probe), which grades the SigLIP arm too.

Equal compute means what the paper compares, equal examples seen (the same batches and steps); the recipe's added
passes cost time, which the report measures per arm rather than hides.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from siglip.experiments.design import Arm, Comparison, Objective, PaperFigure, Results, Scale, Study, TrialResult
from siglip.experiments.prepared import mean_over_headline
from siglip.experiments.report import Table
from siglip.experiments.runner import values
from siglip.experiments.summary import format_mean
from siglip.experiments.trial import log, run_summary

CLAIM = (
    "Tschannen et al. (2025), SigLIP 2, sec. 1 and 3: adding LocCa's decoder (captioning, referring expressions, "
    "grounded captioning; sec. 2.2) and, over the last 20% of training, self-distillation from local views and masked "
    "prediction of an EMA teacher's patch features (sec. 2.3) to the sigmoid loss improves zero-shot classification "
    "and retrieval (Table 1), dense features (Table 2) and localisation (Table 5, attributed to the decoder in sec. "
    "3.4.1), over SigLIP trained on as many examples."
)

TABLE_1 = PaperFigure(
    source="Tschannen et al. (2025), Table 1: zero-shot ImageNet-1k top-1 and COCO retrieval R@1 (%), SigLIP against "
           "SigLIP 2 (40B examples, sec. 2.1) at equal resolution. The B/16 SigLIP 2 also went through the "
           "distillation fine-tuning of sec. 2.5 (ACID); the So/14 did not, so its row isolates the recipe better.",
    columns=["model", "res.", "SigLIP INet", "SigLIP 2 INet", "SigLIP COCO T->I", "SigLIP 2 COCO T->I",
             "SigLIP COCO I->T", "SigLIP 2 COCO I->T"],
    rows=[["B/16", "224", "76.2", "78.2", "47.2", "52.1", "64.5", "68.9"],
          ["B/16", "256", "76.7", "79.1", "47.4", "53.2", "65.1", "69.7"],
          ["So/14", "224", "82.2", "83.2", "50.8", "55.1", "69.0", "71.5"]],
)
TABLE_2 = PaperFigure(
    source="Tschannen et al. (2025), Table 2: probing the frozen image features (linear head for segmentation, mIoU "
           "%; DPT for depth, RMSE, lower is better), So/14.",
    columns=["model", "res.", "PASCAL seg. ↑", "ADE20k seg. ↑", "NYUv2 depth ↓"],
    rows=[["SigLIP", "224", "72.0", "37.6", "0.576"], ["SigLIP 2", "224", "77.1", "41.8", "0.493"],
          ["SigLIP", "384", "73.8", "40.8", "0.563"], ["SigLIP 2", "384", "78.1", "45.4", "0.466"]],
)
TABLE_5 = PaperFigure(
    source="Tschannen et al. (2025), Table 5: referring expression comprehension, accuracy (%) at IoU > 0.5 of a "
           "6-layer decoder trained from scratch on the frozen, un-pooled features (RefCOCO val), sequence length 256.",
    columns=["ViT", "SigLIP", "SigLIP 2", "LocCa"],
    rows=[["B", "64.05", "83.76", "-"], ["L", "67.33", "86.04", "88.34"], ["So", "64.68", "86.42", "-"]],
    note="The paper states no ablation of the decoder against self-distillation; the sections name what each is for "
         "(sec. 2.2 decoder: localisation and OCR; sec. 2.3 self-distillation and masked prediction: local semantics "
         "of the un-pooled features), which our + decoder arm separates.",
)


@dataclass(frozen=True)
class Recipe(Objective):
    """The SigLIP 2 settings of an arm: the `siglip train` flags of the same names (the sigmoid loss stays)."""

    decoder_weight: float = 0.0
    siglip2_from: float | None = None
    distillation_weight: float = 0.25
    ema_decay: float = 0.99


@dataclass(frozen=True)
class Grading:
    """How every trial is scored beyond zero-shot and retrieval."""

    probe_images: int = 4096
    """Training images (seed PROBE_SEED of the stream) whose objects train the referring probe."""
    probe_steps: int = 600
    probe_batch: int = 64

    @staticmethod
    def of(smoke: bool) -> Grading:
        return Grading(probe_images=16, probe_steps=4, probe_batch=8) if smoke else Grading()


PROBE_SEED = 10**6
"""The referring probe's training images come from this seed's stream, apart from every trial seed's."""
SIGLIP, DECODER, FULL = "siglip", "+ decoder", "siglip 2"


def arms(batch: int, steps: int) -> list[Arm]:
    common = dict(batch_size=batch, steps=steps, lr=1e-3, init_logit_bias=None)
    return [Arm(SIGLIP, **common), Arm(DECODER, **common, objective=Recipe(decoder_weight=1.0)),
            Arm(FULL, **common, objective=Recipe(decoder_weight=1.0, siglip2_from=0.8))]


def comparisons() -> list[Comparison]:
    return [
        Comparison("the full recipe beats SigLIP on zero-shot accuracy (Table 1)", (FULL,), (SIGLIP,)),
        Comparison("the full recipe beats SigLIP on image-to-text R@1 (Table 1)", (FULL,), (SIGLIP,), "i2t_r1"),
        Comparison("the full recipe beats SigLIP on text-to-image R@1 (Table 1)", (FULL,), (SIGLIP,), "t2i_r1"),
        Comparison("the full recipe beats SigLIP on the dense probe, balanced accuracy (Table 2)", (FULL,), (SIGLIP,),
                   "dense"),
        Comparison("the full recipe beats SigLIP on referring expressions, new decoder on the frozen tower "
                   "(Table 5)", (FULL,), (SIGLIP,), "referring/probe"),
        Comparison("the decoder alone beats SigLIP on referring expressions, new decoder (sec. 3.4.1)", (DECODER,),
                   (SIGLIP,), "referring/probe"),
        Comparison("self-distillation and masked prediction improve the dense probe over the decoder alone "
                   "(sec. 2.3)", (FULL,), (DECODER,), "dense"),
        Comparison("self-distillation and masked prediction improve zero-shot accuracy over the decoder alone "
                   "(sec. 2, after SILC and TIPS)", (FULL,), (DECODER,)),
        Comparison("the decoder alone against SigLIP on zero-shot accuracy", (DECODER,), (SIGLIP,), predicted=False),
        Comparison("the full recipe against the decoder alone on referring with the trained decoder", (FULL,),
                   (DECODER,), "referring/decoder", predicted=False),
    ]


SCOPE = (
    "Tested: the three arms at equal examples seen, from the same initial towers and the same stream of the shapes "
    "world, on zero-shot and retrieval (the held-out colour-shape pairs), a linear probe of the patch tokens for "
    "each patch's colour and shape (the dense analogue of Table 2's segmentation probe; the paper's protocol also "
    "concatenates the pooled embedding, which we leave out so that the figure is about the patch tokens), and "
    "referring expressions at IoU > 0.5, by a new decoder on the frozen tower (Table 5's protocol) and by the decoder "
    "trained beside it. Not tested: the paper's scale (40B examples, 256 patch tokens, a 256k multilingual "
    "vocabulary), its data (WebLI with open-vocabulary detector boxes; ours are exact), the parallel-prediction "
    "captioning (50% of the time in the paper), the global view's augmentation, depth and normals, and the "
    "distillation fine-tuning of its B models (sec. 2.5). A 32 x 32 image holds 16 patches of 8 pixels, so the dense "
    "tasks are coarse."
)


def study(smoke: bool) -> Study:
    """Full: batch 64, 800 steps (51,200 examples), 4 seeds. Smoke: batch 8, 5 steps, 2 seeds, a 4-step probe."""
    if smoke:
        scale = Scale(vocab_size=128, corpus_size=300, pool_size=8 * 5, test_size=60)
        built = Study("siglip2", "SigLIP 2's recipe: decoder, self-distillation, masked prediction", CLAIM,
                      [TABLE_1, TABLE_2, TABLE_5], arms(8, 5), comparisons(), SCOPE, seeds=(0, 1), scale=scale,
                      smoke=True)
    else:
        scale = Scale(vocab_size=512, corpus_size=4096, pool_size=64 * 800, test_size=600)
        built = Study("siglip2", "SigLIP 2's recipe: decoder, self-distillation, masked prediction", CLAIM,
                      [TABLE_1, TABLE_2, TABLE_5], arms(64, 800), comparisons(), SCOPE, seeds=(0, 1, 2, 3),
                      scale=scale)
    grading = Grading.of(smoke)
    built.setup = [
        f"Training: each trial is a `siglip train` run (num-workers 0, no gradient clipping, t0 = 10, b0 = "
        f"-log(batch - 1)) streaming the seed's samples, each seen once ({scale.pool_size} examples), not a cycled "
        "pool; the recipe arms add `--decoder-weight 1` and, for the full recipe, `--siglip2-from 0.8` with "
        "`--distillation-weight 0.25 --ema-decay 0.99` (the paper's weights for B models; the decoder has the text "
        "tower's shapes and half its layers; 8 local crops; 50% of patches masked)",
        f"Grading: zero-shot and retrieval on the 600 held-out images; the dense probe (logistic regression on the "
        f"frozen patch tokens, fitted on half of the held-out images, scored on the other half, balanced accuracy "
        f"over background and the classes); referring expressions by a new decoder trained for "
        f"{grading.probe_steps} steps of {grading.probe_batch} on the objects of {grading.probe_images} training "
        "images of another seed (the paper's Table 5 protocol), and by the decoder trained with the tower",
    ]
    built.tables = lambda study, results: [dense_table(study, results), cost_table(study, results)]
    return built


def dense_table(study: Study, results: Results) -> Table:
    metrics = [("dense/color", "probe: colour"), ("dense/shape", "probe: shape"), ("dense", "probe: mean"),
               ("referring/probe", "referring, new decoder"), ("referring/probe_crowded", "... images of 2-3 objects"),
               ("referring/decoder", "referring, trained decoder")]
    first = study.arms[0].name
    rows = [["chance", *(f"{100 * results[first][0].chance.get(key, math.nan):.1f}" for key, _ in metrics)]]
    for arm in study.arms:
        rows.append([arm.name, *(format_mean(values(results, arm.name, key), percent=True) if not
                                 math.isnan(values(results, arm.name, key)[0]) else "-" for key, _ in metrics)])
    return Table("Dense features and localisation (%)", ["arm", *(label for _, label in metrics)], rows,
                 note="Probe: balanced accuracy of a linear probe on the frozen patch tokens (each patch's colour or "
                      "shape, or background). Referring: accuracy at IoU > 0.5 over every object of the held-out "
                      "images; chance is a decoder that ignores the image and always answers the mean box.")


def cost_table(study: Study, results: Results) -> Table:
    base = sum(values(results, SIGLIP, "train_seconds")) / len(results[SIGLIP])
    rows = []
    for arm in study.arms:
        seconds = values(results, arm.name, "train_seconds")
        rows.append([arm.name, format_mean(seconds, digits=0), f"{sum(seconds) / len(seconds) / base:.2f}"])
    return Table("Cost: training seconds per trial", ["arm", "seconds", "x SigLIP"], rows,
                 note="Training steps only (siglip train's trained_seconds), one torch thread per trial, on the shared "
                      "2-core CPU: the recipe's decoder runs three targets per image, and its last stage a teacher "
                      "pass, 8 local crops and a masked pass.")


# ------------------------------------------------------------------------------------------------ running the trials


@dataclass(frozen=True)
class SeedJob:
    """Everything a worker process needs to run one seed of the study (picklable)."""

    seed: int
    arms: tuple[Arm, ...]
    scale: Scale
    grading: Grading
    threads: int


def run_trials(study: Study, *, workers: int = 1, threads: int = 1, cache_dir: str | None = None
               ) -> tuple[Results, list[str]]:
    """Every arm on every seed through `siglip train`, a seed per worker process (as siglip.experiments.runner does
    for the other studies); returns arm name -> its trials in seed order, and no extra setup lines."""
    jobs = [SeedJob(seed, tuple(study.arms), study.scale, Grading.of(study.smoke), threads) for seed in study.seeds]
    log(f"{study.name}: {len(study.arms)} arms x {len(jobs)} seeds on {min(workers, len(jobs))} process(es)")
    if workers <= 1 or len(jobs) == 1:
        per_seed = [run_seed(job) for job in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            per_seed = list(pool.map(run_seed, jobs))
    results: dict[str, list[TrialResult]] = {arm.name: [] for arm in study.arms}
    for seed_results in per_seed:
        for result in seed_results:
            results[result.arm].append(result)
    return results, []


def run_seed(job: SeedJob) -> list[TrialResult]:
    """The arms of one seed in turn, graded on one held-out split and one set of probe images."""
    from transformers.utils import logging as hf_logging

    from siglip.data import open_source
    from siglip.model import PRESETS

    torch.set_num_threads(job.threads)
    hf_logging.disable_progress_bar()               # a "loading weights" bar for every trial's final/
    size = PRESETS[job.scale.preset].image_size
    test = HeldOut(open_source(job.scale.data, split="test", image_size=size, with_regions=True),
                   job.scale.test_size)
    stream = open_source(job.scale.data, split="train", seed=PROBE_SEED, image_size=size, with_regions=True)
    probe_samples = [stream.train_sample(index) for index in range(job.grading.probe_images)]
    chance = chance_metrics(test, probe_samples, size // PRESETS[job.scale.preset].patch_size)
    return [run_trial(arm, job.seed, job, test, probe_samples, chance) for arm in job.arms]


class HeldOut:
    """A source whose held-out split is `count` of its test samples, evenly spaced (the shapes split holds its
    one-object images first), rendered once for every arm of a seed."""

    def __init__(self, source, count: int):
        samples = source.test_samples()
        self.source, self.samples = source, samples[::max(1, len(samples) // count)][:count]

    def test_samples(self) -> list:
        return self.samples

    def iter_test_samples(self, skipped=None):
        return iter(self.samples)

    def iter_retrieval_images(self, skipped=None):
        from siglip.data.source import RetrievalImage

        for sample in self.samples:
            yield RetrievalImage(key=sample.key, image=sample.image, captions=[sample.caption])

    def __getattr__(self, name: str):
        return getattr(self.source, name)


def train_config(arm: Arm, seed: int, scale: Scale, out: str):
    """The `siglip train` configuration of one trial."""
    from siglip.train import TrainConfig

    recipe = arm.objective if isinstance(arm.objective, Recipe) else Recipe()
    return TrainConfig(
        data=arm.data or scale.data, model=scale.preset, loss=arm.loss, batch_size=arm.batch_size, steps=arm.steps,
        lr=arm.lr, seed=seed, device="cpu", out=out, overwrite=True, checkpoint_every=0, keep_checkpoints=1,
        num_workers=0, warmup_steps=max(1, round(arm.warmup_fraction * arm.steps)), weight_decay=arm.weight_decay,
        beta2=arm.beta2, grad_clip=arm.grad_clip or 0.0, init_logit_scale=arm.init_logit_scale,
        init_logit_bias=arm.logit_bias_at_start(), positives="ids" if arm.positive_ids else "diagonal",
        vocab_size=scale.vocab_size, max_text_length=scale.max_text_length, tokenizer_captions=scale.corpus_size,
        evaluation=False, plots=False, progress=False, log_every=1, **asdict(recipe))


def run_trial(arm: Arm, seed: int, job: SeedJob, test, probe_samples: list, chance: dict[str, float]) -> TrialResult:
    """Train one arm on one seed with `siglip train`, then grade it; a diverged run scores chance."""
    from siglip.train import train
    from siglip.train.guard import TrainingDiverged

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="siglip2-trial-") as folder:
        config = train_config(arm, seed, job.scale, folder)
        diverged = False
        try:
            with contextlib.redirect_stdout(io.StringIO()):          # the run's own summary table
                summary = train(config)
        except TrainingDiverged:
            diverged, summary = True, {"trained_seconds": math.nan}
        curves = read_curves(folder)
        metrics = dict(chance) if diverged else grade(folder, job, test, probe_samples)
    metrics.update(run_summary(curves), train_seconds=summary["trained_seconds"])
    order = hashlib.sha1(f"{job.scale.data}/{seed}/{arm.batch_size}x{arm.steps}".encode()).hexdigest()
    result = TrialResult(arm.name, seed, metrics, chance, curves, time.perf_counter() - started, diverged, order,
                         os.getloadavg()[0])
    log(f"  {arm.name} (seed {seed}): {arm.steps} steps x {arm.batch_size} in {result.seconds:.0f} s (training "
        f"{metrics['train_seconds']:.0f} s), zeroshot {metrics['zeroshot']:.3f}, dense {metrics['dense']:.3f}, "
        f"referring (probe) {metrics['referring/probe']:.3f}")
    return result


def read_curves(folder: str) -> dict[str, list[float]]:
    import json

    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8")]
    names = ("loss", "logit_scale", "logit_bias", "grad_norm", "loss/decoder", "loss/consistency", "loss/masked")
    return {name: [math.nan if row.get(name) is None else row[name] for row in rows]
            for name in names if any(name in row for row in rows)}


def grade(folder: str, job: SeedJob, test, probe_samples: list) -> dict[str, float]:
    """Held-out metrics of the run in `folder`: zero-shot, retrieval, the dense probe, referring (both decoders)."""
    from siglip.evaluate import evaluate
    from siglip.model import load_model
    from siglip.siglip2 import dense_eval
    from siglip.siglip2.decoder_files import find_decoder, load_decoder
    from siglip.siglip2.referring_probe import train_referring_probe

    model, processor = load_model(os.path.join(folder, "final"))
    zeroshot = evaluate(model, processor, test, "zeroshot")
    retrieval = evaluate(model, processor, test, "retrieval")
    per_task = {task: entry["accuracy"] for task, entry in zeroshot["per_task"].items()}
    metrics = {f"zeroshot/{task}": accuracy for task, accuracy in per_task.items()}
    metrics.update(zeroshot=mean_over_headline(per_task), i2t_r1=retrieval["image_to_text_r1"],
                   t2i_r1=retrieval["text_to_image_r1"])
    where = find_decoder(folder)
    dense = dense_eval.evaluate_dense(model, processor, test, decoder=load_decoder(where) if where else None)
    metrics.update({f"dense/{task}": entry["balanced_accuracy"] for task, entry in dense["probe"].items()})
    metrics.update(dense=dense["balanced_accuracy"], **{"dense/objects": dense["object_accuracy"]})
    if dense["referring"] is not None:
        metrics["referring/decoder"] = dense["referring"]["accuracy"]
        metrics["referring/decoder_crowded"] = dense["referring"]["multi_object_accuracy"]
    grading = job.grading
    probe = train_referring_probe(model, processor, probe_samples, text_length=job.scale.max_text_length,
                                  steps=grading.probe_steps, batch_size=grading.probe_batch, seed=job.seed)
    samples = dense_eval.dense_samples(test)
    features = dense_eval.patch_features(model, processor, [sample.image for sample in samples])
    from siglip.siglip2.boxes import TextEncoder

    referring = dense_eval.referring_accuracy(probe.decoder, probe.vocab, features, samples,
                                              TextEncoder(processor.tokenizer, probe.text_length))
    metrics.update({"referring/probe": referring["accuracy"],
                    "referring/probe_crowded": referring["multi_object_accuracy"]})
    return {name: math.nan if value is None else value for name, value in metrics.items()}


def chance_metrics(test, probe_samples: list, side: int) -> dict[str, float]:
    """What a model that learned nothing scores, keyed like `grade`'s metrics.

    Zero-shot: 1/K per task and the headline mean. R@1: a caption drawn at random matches image i with probability
    |G(i)| / M (G(i): the held-out captions identical to i's up to case and spacing, as siglip eval counts them).
    Dense: 1 / the classes present in the probe's scored half (the probe's own figure). Referring: a decoder that
    ignores the image and always answers the mean box of the probe's training objects.
    """
    from siglip.siglip2 import dense_eval
    from siglip.siglip2.boxes import normalise_box
    from siglip.siglip2.dense import box_iou

    chance = {f"zeroshot/{task}": 1.0 / len(names) for task, names in test.tasks.items()}
    chance["zeroshot"] = mean_over_headline({task: chance[f"zeroshot/{task}"] for task in test.tasks})
    samples = dense_eval.dense_samples(test)
    captions = [" ".join(sample.caption.lower().split()) for sample in samples]
    chance["i2t_r1"] = chance["t2i_r1"] = sum(captions.count(caption) for caption in captions) / len(captions) ** 2
    blind = dense_eval.probe_patches(torch.zeros(len(samples), side * side, 1), samples, (side, side), test.tasks)
    chance.update({f"dense/{task}": entry["chance_balanced"] for task, entry in blind["probe"].items()})
    chance["dense"] = blind["chance_balanced"]
    training = torch.tensor([normalise_box(region.box, *sample.image.size) for sample in probe_samples
                             for region in sample.regions], dtype=torch.float64)
    targets = torch.tensor([normalise_box(region.box, *sample.image.size) for sample in samples
                            for region in sample.regions], dtype=torch.float64)
    crowded = torch.tensor([len(sample.regions) > 1 for sample in samples for _ in sample.regions])
    right = box_iou(training.mean(dim=0).expand_as(targets), targets) > dense_eval.IOU_THRESHOLD
    for name in ("referring/probe", "referring/decoder"):
        chance[name] = float(right.double().mean())
        chance[f"{name}_crowded"] = float(right[crowded].double().mean())
    return chance
