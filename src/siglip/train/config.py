"""The configuration of `siglip train`: TrainConfig, and everything that builds and checks it.

TrainConfig is a typed dataclass, one documented field per setting; it is saved inside every checkpoint. A run's
configuration is the dataclass defaults, then a YAML file (`--config`), then flags (`load_config`); each field is
also a flag of its own, with the field's docstring as its help (`add_config_arguments`). `validate_config` refuses
values that cannot run, `upgrade_config_dict` reads the field names of older configs and checkpoints, and
`RESUMABLE_CHANGES` names the fields a resumed run may change.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from siglip.errors import UserError

LOSSES = ("sigmoid", "softmax")
DEVICES = ("auto", "cpu", "cuda")
POSITIVES = ("ids", "diagonal")
WEIGHT_DECAY_MODES = ("torch", "paper")
"""As siglip.optim.WEIGHT_DECAY_MODES (not imported: reading the flags must not load torch)."""


@dataclass
class TrainConfig:
    """Everything a training run depends on. Saved inside every checkpoint; each field is also a CLI flag."""

    data: str = "shapes"
    """Training source: shapes, digits, a WebDataset shard pattern, or a .csv/.tsv/.jsonl file (docs/data.md)."""
    model: str = "tiny"
    """Model preset of siglip.model.PRESETS (tiny, small, base, naflex-tiny, naflex-base)."""
    loss: str = "sigmoid"
    """sigmoid (SigLIP, pairwise) or softmax (CLIP)."""
    batch_size: int = 256
    """Global contrastive batch, split evenly across ranks (must be divisible by the number of processes)."""
    steps: int = 1000
    """Optimiser updates in the whole run."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of the warm-up."""
    seed: int = 0
    """Seeds the model's initialisation, the data order and the tokenizer."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available); under torchrun each rank takes cuda:LOCAL_RANK."""
    out: str = "runs/train"
    """Run directory: metrics.jsonl, tensorboard/, checkpoints/, processor/, final/, plots."""
    resume: bool = False
    """Continue from the newest checkpoint in --out (start fresh if there is none yet)."""
    overwrite: bool = False
    """Delete a previous run's outputs in --out instead of refusing to start."""
    checkpoint_every: int = 100
    """Write a checkpoint every N updates (and always after the last); 0 writes only the last."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 loads in the training process)."""
    strict: bool = False
    """Stop at the first bad sample (exit status 2, naming it) instead of skipping and counting it."""
    init: str | None = None
    """Start from this Hugging Face SigLIP directory (its weights and its tokenizer) instead of a fresh model."""
    lock_image: bool = False
    """Freeze the image tower (LiT): no gradients, eval mode, no optimiser state."""
    cache_image_features: bool = False
    """With --lock-image (SigLiT): embed each image once and reuse its embedding when the image comes back, so later
    epochs run only the text tower (docs/finetune.md). Costs n_images x d x 4 bytes of CPU memory per rank (d: the
    image embedding width); not checkpointed, a resumed run rebuilds it. Saves nothing on a procedural source such
    as shapes, whose images never repeat."""
    micro_batch: int | None = None
    """Encode each rank's batch this many samples at a time; the gradient equals the full batch's."""
    warmup_steps: int = 50
    """Updates of linear learning-rate warm-up before the cosine decay."""
    min_lr_ratio: float = 0.0
    """The cosine decays towards this fraction of --lr, which it reaches as the run ends."""
    weight_decay: float = 1e-4
    """Weight decay of weight matrices (never biases, norms, t' or b), in the convention of --weight-decay-mode."""
    weight_decay_mode: str = "torch"
    """torch: AdamW's decay, multiplied by the learning rate, on every weight matrix; paper: big_vision's, where
    SigLIP was trained, not multiplied by the learning rate and on linear and convolution kernels only (the same
    as torch with --weight-decay divided by --lr; docs/finetune.md).

    siglip.optim's module docstring states both. The paper's recipe (lr 1e-3, wd 1e-4) is paper; torch with 1e-4
    decays a thousand times less."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.95
    """Adam's second-moment decay; the paper lowers it from 0.999 for stability."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    logit_lr_multiplier: float = 1.0
    """Learning rate of t' and b relative to --lr (Adam moves a scalar by about lr per update)."""
    init_logit_scale: float = 10.0
    """t at the start (the model stores t' = log t); the paper uses 10."""
    init_logit_bias: float = -10.0
    """b at the start; the paper's -10 suits its batch of 32k (-log 32768 = -10.4), and a smaller batch B starts
    better near -log B (configs/demo.yaml)."""
    max_consecutive_skips: int = 5
    """Stop the run (exit status 3) when this many updates in a row had a non-finite loss or gradient norm.

    Each such update is skipped (siglip.train.guard): one spike passes, a run that diverged fails at every step."""
    positives: str = "ids"
    """Which pairs of a batch are positives: ids, every pair whose samples share a class or (without labels) a
    caption up to case and punctuation, or diagonal, each image with its own caption only (docs/experiments.md).

    ids is the default for every source: an image is not pushed away from a caption that is true of it (digits:
    about 13 per row at batch 128). Measured by `siglip reproduce positives` (docs/experiments.md): +3.0 points of
    digits zero-shot accuracy with the softmax loss, within noise with the sigmoid loss, never measurably worse; on
    web data equal captions are rare and it changes little. diagonal is the paper's labels."""
    decoder_weight: float = 0.0
    """Weight of the SigLIP 2 recipe's LocCa decoder loss beside the contrastive loss (the paper's 1); 0 trains no
    decoder.

    The decoder reads the image tower's patch tokens and learns captioning and, on sources that know where their
    objects are (shapes), referring expressions and grounded captioning (docs/experiments.md, siglip2). It is saved
    in checkpoints and beside final/ in DIR/decoder; final/ stays a plain SigLIP model."""
    siglip2_from: float | None = None
    """Add SigLIP 2's self-distillation and masked prediction from this fraction of the run on (the paper's 0.8: the
    last fifth); None never.

    An EMA teacher of the image tower sees each whole image; the student matches it from 8 local crops and, with
    half its patches masked, at the masked patches (siglip.siglip2.recipe)."""
    ema_decay: float = 0.99
    """Decay of the EMA teacher per update (its time constant is 1 / (1 - decay) updates).

    0.99 follows the student over about 100 updates, a fifth of a 500-step stage; DINO's 0.996 (and up) suits runs of
    hundreds of thousands of updates, where the teacher would barely move in a short run's last 20%."""
    distillation_weight: float = 0.25
    """Weight of the last stage's two losses, which enter as 1x and 0.25x it (consistency, masked prediction): the
    paper's factor for B-size models, 0.25 (0.5 for L, 1 for So400m)."""
    image_size: int | None = None
    """Image side in pixels; None takes the preset's."""
    max_num_patches: int | None = None
    """NaFlex models: at most this many patches an image (the patch budget); None keeps an --init checkpoint's, or for
    a NaFlex preset takes (--image-size / patch size)^2."""
    vocab_size: int = 1024
    """Tokenizer vocabulary, trained on the source's captions at the start of the run."""
    max_text_length: int = 16
    """Tokens per caption (the paper's 16): shorter captions are padded, longer ones cut short and counted
    (truncated_captions in metrics.jsonl and the summary)."""
    tokenizer_captions: int = 20000
    """Captions drawn from the source to train the tokenizer on."""
    classes: str | None = None
    """Class names, one a line, for zero-shot evaluation of sources that bring none."""
    templates: str | None = None
    """Prompt templates, one a line with {} for the class name, for zero-shot evaluation."""
    image_column: str | None = None
    """A .csv/.tsv/.jsonl source's image column, when it is not named as usual (filepath, image, ...)."""
    caption_column: str | None = None
    """A table source's caption column, when it is not named as usual (caption, text, ...)."""
    label_column: str | None = None
    """A table source's class-label column, when it is not named as usual (label, class, ...)."""
    evaluation: bool = True
    """Evaluate on the source's held-out split (for a file source that is every sample of its files: turn it off
    for a large one)."""
    eval_every: int = 200
    """Evaluate every N updates (and always at the end); 0 evaluates only at the end."""
    eval_batch_size: int = 256
    """Images or texts per forward pass during evaluation."""
    log_every: int = 10
    """Write a metrics.jsonl row every N updates (and at every evaluation and the last update)."""
    plots: bool = True
    """Draw the loss, t and b curves and a heat map of held-out pairs into --out at the end."""
    progress: bool = True
    """Show a progress bar on stderr."""


# Fields that may differ between a run and its resumption: where and how it runs, not what it computes
# (micro-batches and the image-feature cache change only the rounding of the gradient, not its value).
RESUMABLE_CHANGES = frozenset({
    "out", "resume", "overwrite", "device", "num_workers", "micro_batch", "checkpoint_every", "keep_checkpoints",
    "strict", "cache_image_features", "max_consecutive_skips",
    "evaluation", "eval_every", "eval_batch_size", "log_every", "plots", "progress",
})


# Fields of older config files and checkpoints -> how to read them today.
LEGACY_FIELDS = {"positive_ids": "positives"}
"""positive_ids: true/false (before --positives) reads as positives: ids/diagonal."""


# ------------------------------------------------------------------------------------------------ configuration


def config_fields() -> dict[str, tuple[Any, str]]:
    """TrainConfig field name -> (resolved type, its docstring)."""
    hints = typing.get_type_hints(TrainConfig)
    docs = _attribute_docstrings(TrainConfig)
    return {item.name: (hints[item.name], docs.get(item.name, "")) for item in fields(TrainConfig)}


def load_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """The run's configuration: TrainConfig's defaults, then the YAML file at `path`, then `overrides` (flags).

    Args:
        path: a YAML mapping of field names (dashes or underscores) to values, or None.
        overrides: field name -> value; None values are ignored (a flag that was not given).

    Raises:
        UserError: the file is missing or not a mapping, names an unknown field, or gives a value of the wrong type.
    """
    known = config_fields()
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            with open(path, encoding="utf-8") as handle:
                document = yaml.safe_load(handle)
        except FileNotFoundError:
            raise UserError(f"--config {path}: no such file; give a YAML file such as configs/demo.yaml") from None
        except yaml.YAMLError as error:
            raise UserError(f"--config {path} is not valid YAML: {' '.join(str(error).split())}") from None
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise UserError(f"--config {path} must hold a mapping of field: value, got a {type(document).__name__}")
        legacy = {}
        for key, value in document.items():
            name = str(key).replace("-", "_")
            if name in LEGACY_FIELDS:
                legacy[name] = (key, value)         # read after the file's other fields, to catch a contradiction
                continue
            if name not in known:
                raise UserError(f"--config {path}: unknown field {key!r}; known fields: {', '.join(known)}")
            values[name] = _coerce(name, value, known[name][0], f"--config {path}: {key}")
        for name, (key, value) in legacy.items():
            _read_legacy(values, name, value, f"--config {path}: {key}")
    for name, value in overrides.items():
        if value is None:
            continue
        if name in LEGACY_FIELDS:
            values.pop(LEGACY_FIELDS[name], None)         # a flag overrides the file, whichever name either uses
            _read_legacy(values, name, value, name)
            continue
        if name not in known:
            raise UserError(f"unknown training option {name!r}; known: {', '.join(known)}")
        values[name] = _coerce(name, value, known[name][0], f"--{name.replace('_', '-')}")
    return TrainConfig(**values)


def upgrade_config_dict(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a checkpoint's, a run directory's) with older field names read as today's."""
    upgraded = {name: value for name, value in values.items() if name not in LEGACY_FIELDS}
    for name in LEGACY_FIELDS:
        if name in values and LEGACY_FIELDS[name] not in values:
            _read_legacy(upgraded, name, values[name], f"saved config: {name}")
    return upgraded


def _read_legacy(values: dict[str, Any], name: str, value: Any, where: str) -> None:
    """Store an older field's value under its new name (positive_ids: true -> positives: ids)."""
    flag = _coerce(name, value, bool, where)
    new = "ids" if flag else "diagonal"
    if values.get("positives", new) != new:
        raise UserError(f"{where}: positive_ids {value!r} contradicts positives {values['positives']!r}; "
                        "keep only positives (ids or diagonal)")
    values["positives"] = new


def validate_config(config: TrainConfig, world_size: int = 1) -> None:
    """Refuse a configuration that cannot run, saying which value is wrong and what would work."""
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise UserError(message)

    need(config.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    need(config.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {config.device!r}")
    need(config.positives in POSITIVES,
         f"--positives must be one of {', '.join(POSITIVES)}, got {config.positives!r}")
    need(config.batch_size >= 2, f"--batch-size must be at least 2 (a contrastive batch needs negatives), "
                                 f"got {config.batch_size}")
    need(config.batch_size % world_size == 0,
         f"--batch-size {config.batch_size} is the global batch and must be divisible by the number of processes "
         f"({world_size}); use a multiple of {world_size}, e.g. {world_size * max(1, config.batch_size // world_size)}")
    need(config.steps >= 1, f"--steps must be at least 1, got {config.steps}")
    need(config.lr > 0 and math.isfinite(config.lr), f"--lr must be a positive number, got {config.lr}")
    need(config.warmup_steps >= 0, f"--warmup-steps must be 0 or more, got {config.warmup_steps}")
    need(config.warmup_steps < config.steps or config.warmup_steps == 0,
         f"--warmup-steps {config.warmup_steps} must be fewer than --steps {config.steps}: the warm-up would take "
         f"the whole run, and the learning rate would never decay from its peak (or never reach it); give e.g. "
         f"--warmup-steps {config.steps // 10} (a tenth of the run)")
    need(0 <= config.min_lr_ratio <= 1, f"--min-lr-ratio must lie in [0, 1], got {config.min_lr_ratio}")
    need(config.weight_decay >= 0, f"--weight-decay must be 0 or more, got {config.weight_decay}")
    need(config.weight_decay_mode in WEIGHT_DECAY_MODES,
         f"--weight-decay-mode must be one of {', '.join(WEIGHT_DECAY_MODES)}, got {config.weight_decay_mode!r}")
    need(config.max_consecutive_skips >= 1,
         f"--max-consecutive-skips must be at least 1, got {config.max_consecutive_skips}")
    need(0 <= config.beta1 < 1 and 0 <= config.beta2 < 1,
         f"--beta1 and --beta2 must lie in [0, 1), got {config.beta1} and {config.beta2}")
    need(config.grad_clip >= 0, f"--grad-clip must be 0 (off) or positive, got {config.grad_clip}")
    need(config.logit_lr_multiplier > 0, f"--logit-lr-multiplier must be positive, got {config.logit_lr_multiplier}")
    need(config.init_logit_scale > 0 and math.isfinite(config.init_logit_scale),
         f"--init-logit-scale is t itself and must be a positive number, got {config.init_logit_scale}")
    need(math.isfinite(config.init_logit_bias), f"--init-logit-bias must be finite, got {config.init_logit_bias}")
    need(config.checkpoint_every >= 0, f"--checkpoint-every must be 0 (only at the end) or more, "
                                       f"got {config.checkpoint_every}")
    need(config.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got {config.keep_checkpoints}")
    need(config.num_workers >= 0, f"--num-workers must be 0 or more, got {config.num_workers}")
    need(config.micro_batch is None or config.micro_batch >= 1,
         f"--micro-batch must be a positive number of samples, got {config.micro_batch}")
    need(config.eval_every >= 0, f"--eval-every must be 0 (only at the end) or more, got {config.eval_every}")
    need(config.eval_batch_size >= 1, f"--eval-batch-size must be positive, got {config.eval_batch_size}")
    need(config.log_every >= 1, f"--log-every must be at least 1, got {config.log_every}")
    need(config.vocab_size >= 16, f"--vocab-size must be at least 16, got {config.vocab_size}")
    need(config.max_text_length >= 2, f"--max-text-length must be at least 2, got {config.max_text_length}")
    need(config.max_text_length <= 64, f"--max-text-length must be at most 64 (the text position table that "
                                       f"transformers' zero-shot pipeline pads to), got {config.max_text_length}")
    need(config.max_num_patches is None or config.max_num_patches >= 1,
         f"--max-num-patches must be a positive number of patches, got {config.max_num_patches}")
    need(config.tokenizer_captions >= 1, f"--tokenizer-captions must be positive, got {config.tokenizer_captions}")
    need(config.image_size is None or config.image_size >= 8, f"--image-size must be at least 8, "
                                                               f"got {config.image_size}")
    need(not (config.resume and config.overwrite), "--resume and --overwrite contradict each other; choose one")
    need(config.decoder_weight >= 0 and math.isfinite(config.decoder_weight),
         f"--decoder-weight must be 0 (no decoder) or a positive number, got {config.decoder_weight}")
    need(config.siglip2_from is None or 0 <= config.siglip2_from <= 1,
         f"--siglip2-from must be a fraction of training in [0, 1] (0.8: the last 20%), got {config.siglip2_from}")
    need(0 <= config.ema_decay <= 1, f"--ema-decay must lie in [0, 1], got {config.ema_decay}")
    need(config.distillation_weight >= 0 and math.isfinite(config.distillation_weight),
         f"--distillation-weight must be 0 or a positive number, got {config.distillation_weight}")
    need(not (config.lock_image and (config.decoder_weight > 0 or config.siglip2_from is not None)),
         "--decoder-weight and --siglip2-from train the image tower, which --lock-image freezes; drop --lock-image "
         "(or the SigLIP 2 flags)")
    need(not config.cache_image_features or config.lock_image,
         "--cache-image-features needs --lock-image: only a frozen image tower gives an image the same embedding "
         "at every step; add --lock-image (SigLiT) or drop --cache-image-features")
    if config.init is not None:
        need(Path(config.init).is_dir(), f"--init {config.init}: no such directory; give a Hugging Face SigLIP "
                                         "directory (a DIR/final written by siglip train, or a downloaded one)")


def _coerce(name: str, value: Any, kind: Any, where: str) -> Any:
    """`value` as the field's type; YAML reads 1e-3 as a string, so numbers are parsed from strings too."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise UserError(f"{where} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def first_sentence(doc: str) -> str:
    """A field docstring's first sentence, on one line: a flag's help says what the flag does, and the rest of the
    docstring (why, measurements) stays with the code and the docs."""
    text = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0]


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal that follows it in the class body (PEP 257 attribute docstrings)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:], strict=False):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = following.value.value
    return docs


# ------------------------------------------------------------------------------------------------ command line


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--batch-size for batch_size, ...) plus --config FILE.yaml."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of TrainConfig fields; flags override it")
    for name, (kind, doc) in config_fields().items():
        flag = "--" + name.replace("_", "-")
        default = getattr(TrainConfig, name, None)
        help_text = f"{first_sentence(doc)} (default: {default})"
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            base = next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind)
            choices = {"loss": LOSSES, "device": DEVICES, "positives": POSITIVES,
                       "weight_decay_mode": WEIGHT_DECAY_MODES}.get(name)
            parser.add_argument(flag, dest=name, type=base, default=None, choices=choices,
                                metavar=name.upper() if choices is None else None, help=help_text)
