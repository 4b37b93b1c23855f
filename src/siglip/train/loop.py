"""`siglip train`: the training loop. It wires parts defined elsewhere and defines none of them.

    configuration (siglip.train.config: TrainConfig, YAML and flags, validation)
    -> processes (siglip.train.processes) and the run's directory (siglip.train.run_directory)
    -> one step's forward and backward (siglip.train.step: towers, loss, micro-batches)

    data (siglip.data) -> tokenizer and processor (siglip.tokenizer) -> SiglipModel (siglip.model)
    -> loss (siglip.loss: sigmoid through the tiled kernel or the ring, softmax through an all-gather)
    -> AdamW with warm-up and cosine decay (siglip.optim) -> checkpoints and the final export (siglip.checkpoint)
    -> evaluation (siglip.evaluate), metrics, the summary table and plots (siglip.train.summary)

Several processes (torchrun): each rank loads its own contiguous slice of the global batch, the sigmoid loss runs
the ring over the default group, and DistributedDataParallel averages the gradients. The losses return each rank's
share normalised by its local batch, so that average is exactly the gradient of the global-batch loss.

SigLiT (`--lock-image --cache-image-features`): the frozen image tower embeds each image once, the first time a
batch holds it; later batches look the embedding up by sample key (siglip.train.feature_cache) and run only the text
tower.

Resuming (`--resume`) restores the model, optimiser, scheduler, data position and RNG states of the newest
checkpoint; on the CPU a resumed run ends bitwise equal to an uninterrupted one (tests/train/test_loop.py). A run
may resume under another number of processes: the data order, the schedule and the global batch do not depend on
it, so the run continues where it stopped, equal to an uninterrupted one up to rounding.

An update whose loss or gradient norm is not finite is skipped, and a run whose updates keep failing stops with
exit status 3 (siglip.train.guard).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from siglip import checkpoint as ckpt
from siglip.errors import UserError
from siglip.train.config import TrainConfig, add_config_arguments, config_fields, load_config, validate_config
from siglip.train.guard import (
    DivergenceGuard,
    TrainingDiverged,
    agree_on_update,
    grad_clip_norm,
    holds_non_finite,
    non_finite_state_message,
)
from siglip.train.processes import Processes, start_processes
from siglip.train.recipe import Recipe, mean_over_ranks, recipe_enabled
from siglip.train.run_directory import RunDirectory, check_resumable
from siglip.train.step import ContrastiveTowers, PairTransform, forward_backward, frozen_image_encoder
from siglip.train.summary import (
    HeldOut,
    draw_plots,
    evaluate_held_out,
    flatten_eval,
    scale_and_bias_values,
    summary_table,
    train_row,
)

if TYPE_CHECKING:
    from siglip.train.feature_cache import ImageFeatureCache


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training as `config` says and write its outputs into config.out (see CONTRACT.md).

    Returns the final metrics: step, loss, logit_scale, logit_bias, the last evaluation ("zeroshot", "retrieval"),
    bad samples skipped by kind, captions cut short, updates skipped, the world size, and wall_time_s.

    Raises:
        TrainingDiverged: `max_consecutive_skips` updates in a row had a non-finite loss or gradient norm; its
            message (printed on stderr by rank 0) names the step and the newest checkpoint.
    """
    started = time.perf_counter()
    processes = start_processes(config.device)
    try:
        validate_config(config, processes.world_size)
        return _train(config, processes, started)
    finally:
        if processes.started_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, processes: Processes, started: float) -> dict[str, Any]:
    from siglip.data import make_train_loader

    run = RunDirectory(config, processes)
    resume_from = run.prepare_directory()
    checkpoint = ckpt.load_checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        check_resumable(config, checkpoint)

    _seed_everything(config.seed)
    model, processor, source = _model_processor_source(config, run)
    held_out = HeldOut(source)
    if config.lock_image:
        model.vision_model.requires_grad_(False)
    if config.loss == "softmax":
        # The softmax is invariant to a shift of every logit: b receives no gradient, so it is not trained.
        model.logit_bias.requires_grad_(False)
    model.to(processes.device)
    recipe = Recipe(config, model, processor, processes.device) if recipe_enabled(config) else None
    trained = recipe.trained() if recipe is not None else model       # everything the optimiser updates

    from siglip.optim import build_optimizer

    optimizer, scheduler = build_optimizer(
        trained, lr=config.lr, weight_decay=config.weight_decay, beta1=config.beta1, beta2=config.beta2,
        logit_lr_multiplier=config.logit_lr_multiplier, warmup_steps=config.warmup_steps,
        total_steps=config.steps, min_lr_ratio=config.min_lr_ratio, weight_decay_mode=config.weight_decay_mode,
    )
    guard = DivergenceGuard(config.max_consecutive_skips)
    step, samples_seen, trained_seconds = 0, 0, 0.0
    if checkpoint is not None:
        model.load_state_dict(recipe.load_state(checkpoint.model_state) if recipe is not None
                              else checkpoint.model_state)
        optimizer.load_state_dict(checkpoint.optimizer_state)
        scheduler.load_state_dict(checkpoint.scheduler_state)
        step = checkpoint.step
        samples_seen = int(checkpoint.state.get("samples_seen", 0))
        trained_seconds = float(checkpoint.state.get("trained_seconds", 0.0))
        run.bad_base.update(checkpoint.state.get("bad_samples", {}))
        run.truncated_base = int(checkpoint.state.get("truncated_captions", 0))
        guard.load_state(checkpoint.state)
        rank_rng = checkpoint.rng_states[processes.rank] if processes.rank < len(checkpoint.rng_states) else None
        if rank_rng is not None:
            ckpt.restore_rng_state(rank_rng)
        else:
            _seed_everything(config.seed * 1000 + processes.rank + step)
        if processes.is_main:
            print(f"siglip train: resumed from {checkpoint.path} (step {step} of {config.steps})", flush=True)
            saved_world = int(checkpoint.state.get("world_size", processes.world_size))
            if saved_world != processes.world_size:
                print(f"siglip train: the checkpoint was written by {saved_world} processes, this run has "
                      f"{processes.world_size}: the data order, the schedule and the global batch continue as they "
                      "were; the result equals an uninterrupted run's up to rounding (and, with dropout, other "
                      "random draws)", flush=True)
    del checkpoint

    run.open_logs(step)
    towers: nn.Module = recipe.towers() if recipe is not None else ContrastiveTowers(model, config.lock_image)
    if processes.world_size > 1:
        # The recipe's heads take no part before the switch-on step: DDP must be told to expect unused parameters.
        towers = nn.parallel.DistributedDataParallel(
            towers, device_ids=[processes.device.index] if processes.device.type == "cuda" else None,
            find_unused_parameters=recipe is not None,
        )
    local_batch = config.batch_size // processes.world_size
    autocast_dtype = torch.bfloat16 if processes.device.type == "cuda" else None
    trainable = [parameter for parameter in trained.parameters() if parameter.requires_grad]

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (processes.is_main and config.progress))
    last_eval: dict[str, Any] = {}
    row: dict[str, Any] = {}
    terms: dict[str, float] = {}            # the last step's loss by part (the recipe's terms)
    loader = None
    transform = recipe.transform(processor) if recipe is not None else PairTransform(processor)
    cache = _image_feature_cache(config, source, transform, step, local_batch, processes)
    # Each cache fill runs the tower on groups of one fixed size, so that a cached embedding does not depend on the
    # batch the image first came in: a resumed run fills its cache at other steps than an uninterrupted one.
    encode_new_images = (frozen_image_encoder(model, processes.device, config.micro_batch or local_batch,
                                              autocast_dtype) if cache is not None else None)
    if step < config.steps:
        loader = iter(make_train_loader(
            source, transform=transform, local_batch=local_batch, rank=processes.rank,
            world_size=processes.world_size, start_step=step, seed=config.seed, num_workers=config.num_workers,
            strict=config.strict,
        ))
    window_start, window_steps = time.perf_counter(), 0
    _set_train_mode(model, config.lock_image)
    try:
        while step < config.steps:
            step_start = time.perf_counter()
            batch = next(loader)        # under --strict a bad sample raises BadSample, a UserError naming its key
            if batch.step != step:
                raise RuntimeError(f"the data loader returned batch {batch.step} for step {step}")
            if cache is not None:
                # Only images never seen are embedded (and moved to the device); the rest are looked up.
                image_features = cache.features(batch.keys, batch.tensors["pixel_values"], encode_new_images)
                image_features, pixel_values = image_features.to(processes.device, non_blocking=True), None
            else:
                image_features = None
                pixel_values = batch.tensors["pixel_values"].to(processes.device, non_blocking=True)
            input_ids = batch.tensors["input_ids"].to(processes.device, non_blocking=True)
            positive_ids = batch.positive_ids.to(processes.device) if config.positives == "ids" else None
            lr = optimizer.param_groups[0]["lr"]
            recipe_inputs = (recipe.inputs(step, batch.tensors, pixel_values, rank=processes.rank,
                                           chunk=config.micro_batch, autocast_dtype=autocast_dtype,
                                           group=processes.group) if recipe is not None else None)
            loss = forward_backward(towers, pixel_values, input_ids, positive_ids, loss=config.loss,
                                    group=processes.group, micro_batch=config.micro_batch,
                                    autocast_dtype=autocast_dtype, image_features=image_features,
                                    recipe_inputs=recipe_inputs, terms=terms)
            grad_norm = nn.utils.clip_grad_norm_(trainable, grad_clip_norm(config.grad_clip))
            # One all-reduce: every rank skips the same updates (and `loss` becomes the mean over ranks).
            finite, loss = agree_on_update(loss, grad_norm, processes.world_size)
            if finite:
                optimizer.step()
            if recipe is not None:
                recipe.after_update(step, finite)
            guard.record(finite)
            with warnings.catch_warnings():
                # A skipped first update moves the schedule on before the optimiser ever stepped, as meant.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples_seen += config.batch_size
            window_steps += 1
            run.bad_local.update(batch.bad)
            if "caption_truncated" in batch.tensors:
                run.truncated_local += int(batch.tensors["caption_truncated"].sum())
            trained_seconds += time.perf_counter() - step_start
            bar.update(1)

            evaluate_now = config.evaluation and not guard.diverged and (
                step == config.steps or (config.eval_every > 0 and step % config.eval_every == 0))
            if step % config.log_every == 0 or step == config.steps or evaluate_now or not finite:
                elapsed = time.perf_counter() - window_start
                bad, truncated = run.totals()
                row = train_row(model, step, loss, lr, grad_norm, window_steps * config.batch_size / elapsed,
                                samples_seen, bad, truncated, guard.skipped)
                if recipe is not None:
                    parts = mean_over_ranks(terms, processes.world_size, processes.device)
                    row.update({f"loss/{name}": value for name, value in parts.items()})
                if evaluate_now:
                    last_eval = evaluate_held_out(model, processor, held_out, config, processes)
                    row.update(flatten_eval(last_eval))
                    _set_train_mode(model, config.lock_image)
                run.log(row)
                bar.set_postfix(loss="skipped" if row["loss"] is None else f"{row['loss']:.4f}",
                                t=f"{row['logit_scale']:.2f}", b=f"{row['logit_bias']:.2f}",
                                samples_s=f"{row['samples_per_s']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if guard.diverged:
                _stop(guard.message(step, ckpt.latest_checkpoint(run.checkpoints)), processes, bar)
            # While updates are being skipped a checkpoint would hold nothing new, and pruning the old ones could
            # drop the last checkpoint from before the trouble: wait for a good update (or the end).
            if step == config.steps or (config.checkpoint_every > 0 and step % config.checkpoint_every == 0
                                        and guard.consecutive == 0):
                if holds_non_finite(trained, optimizer):
                    _stop(non_finite_state_message(step), processes, bar)
                run.save(model, optimizer, scheduler, step, samples_seen, trained_seconds, guard.state(),
                         extra_state=recipe.state_dict() if recipe is not None else None)
    finally:
        bar.close()
        del loader

    if not row:
        # Resumed a finished run: nothing trained, so evaluate the restored model again for the summary.
        if config.evaluation:
            last_eval = evaluate_held_out(model, processor, held_out, config, processes)
        scale, bias = scale_and_bias_values(model)
        row = {"step": step, "logit_scale": scale, "logit_bias": bias}
    from siglip.tokenizer import text_length

    bad, truncated = run.totals()
    result: dict[str, Any] = {}
    if processes.is_main:
        ckpt.export_final(model, processor, run.out / "final")
        if recipe is not None:
            recipe.export(run.out)
        result = {
            "step": step, "loss": row.get("loss"), "logit_scale": row["logit_scale"],
            "logit_bias": row["logit_bias"], **last_eval, "bad_samples": dict(bad),
            "truncated_captions": truncated, "text_length": text_length(processor.tokenizer),
            "skipped_updates": guard.skipped, "world_size": processes.world_size, "batch_size": config.batch_size,
            "trained_seconds": trained_seconds, "wall_time_s": time.perf_counter() - started,
        }
        if config.plots:
            draw_plots(run, model, processor, held_out, config)
        (run.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(summary_table(config, result), flush=True)
        run.writer.close()
    processes.barrier()
    return result


# ------------------------------------------------------------------------------------------------ step helpers


def _model_processor_source(config: TrainConfig, run: RunDirectory) -> tuple[nn.Module, Any, Any]:
    """The model, its processor and the training source.

    A fresh run trains the tokenizer once, on rank 0, from the source's caption corpus, and saves the processor in
    --out/processor, which every other rank and every resumption loads: all of them tokenise alike.
    """
    from transformers import AutoProcessor

    from siglip.data import open_source
    from siglip.model import PRESETS, build_model, load_model, model_image_size
    from siglip.tokenizer import build_processor, set_patch_budget, train_tokenizer

    processes = run.processes
    processor_dir = run.out / "processor"
    model = None
    max_num_patches = config.max_num_patches                           # a NaFlex model's patch budget, if given
    if config.init is not None:
        model, processor = load_model(config.init)
        if max_num_patches is not None:
            set_patch_budget(processor, max_num_patches)
        image_size = model_image_size(model)
    elif config.model not in PRESETS:
        raise UserError(f"--model {config.model!r} is not a preset; choose one of {', '.join(PRESETS)}")
    else:
        image_size = config.image_size or PRESETS[config.model].image_size
    source = open_source(config.data, split="train", seed=config.seed, strict=config.strict,
                         classes_file=config.classes, templates_file=config.templates, image_size=image_size,
                         with_regions=config.decoder_weight > 0, image_column=config.image_column,
                         caption_column=config.caption_column, label_column=config.label_column)

    if processes.is_main and not processor_dir.exists():
        if model is None:
            tokenizer = train_tokenizer(source.caption_corpus(config.tokenizer_captions),
                                        vocab_size=config.vocab_size, max_length=config.max_text_length,
                                        seed=config.seed)
            processor = build_processor(tokenizer, image_size=image_size, preset=config.model,
                                        max_num_patches=max_num_patches)
        _save_processor(processor, processor_dir)
    processes.barrier()
    processor = AutoProcessor.from_pretrained(str(processor_dir))
    if model is None:
        # Seeded here so the initial weights do not depend on what ran before (tokenizer training, resumption).
        _seed_everything(config.seed)
        model = build_model(config.model, vocab_size=len(processor.tokenizer), max_text_length=config.max_text_length,
                            image_size=image_size, init_logit_scale=config.init_logit_scale,
                            init_logit_bias=config.init_logit_bias)
    return model, processor, source


def _save_processor(processor: Any, directory: Path) -> None:
    """Save atomically: a rank or a resumption never finds half a processor."""
    temporary = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    processor.save_pretrained(str(temporary))
    os.replace(temporary, directory)


def _image_feature_cache(config: TrainConfig, source: Any, transform: PairTransform, step: int, local_batch: int,
                         processes: Processes) -> ImageFeatureCache | None:
    """The cache of a --cache-image-features run (None otherwise), sized for the most distinct images this rank
    can meet in the remaining steps: steps x local batch, and never more than the source holds."""
    if not config.cache_image_features:
        return None
    if transform.augments_images:
        raise UserError("--cache-image-features cannot be used with random image augmentation: a cached embedding "
                        "would freeze one augmented view of each image; drop --cache-image-features")
    from siglip.train.feature_cache import ImageFeatureCache

    size = source.__len__()
    capacity = max(1, (config.steps - step) * local_batch)
    if size is None:
        if processes.is_main:
            print(f"siglip train: {config.data} is an endless source whose images never repeat: "
                  "--cache-image-features only costs memory here", file=sys.stderr, flush=True)
    else:
        capacity = min(capacity, size)
    return ImageFeatureCache(capacity)


def _stop(message: str, processes: Processes, bar: Any) -> None:
    """End a run that diverged: the one-line reason on stderr (rank 0) after the progress bar, then every rank
    raises TrainingDiverged together (the barrier: under torchrun no rank exits before rank 0 has spoken)."""
    bar.close()
    if processes.is_main:
        print(f"siglip train: {message}", file=sys.stderr, flush=True)
    processes.barrier()
    raise TrainingDiverged(message)


def _set_train_mode(model: nn.Module, lock_image: bool) -> None:
    model.train()
    if lock_image:
        model.vision_model.eval()     # a frozen tower keeps its inference behaviour (dropout off)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ command line


HELP_EXAMPLES = """\
examples:
  siglip train --config configs/demo.yaml --out runs/demo          # the demo: tiny model, shapes, CPU
  siglip train --init runs/demo/final --data mydata/train.csv --lock-image --steps 30 --lr 1e-4 \\
      --warmup-steps 3 --out runs/finetune                         # fine-tune a checkpoint (docs/finetune.md)
  torchrun --nproc-per-node 2 -m siglip train --config configs/demo.yaml --out runs/demo2   # 2 processes

Every flag is a field of TrainConfig (src/siglip/train/config.py), also accepted in a --config YAML file; flags
override the file. docs/data.md describes the data sources, docs/finetune.md fine-tuning and its flags,
docs/distributed.md torchrun. Exit status: 0 done, 2 bad input, 3 the run diverged and was stopped.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--batch-size for batch_size, ...) plus --config FILE.yaml
    (siglip.train.config); a short usage line and examples come first in --help."""
    parser.usage = "siglip train [--config FILE.yaml] [--data SOURCE] [--model PRESET] [--out DIR] [--FLAG VALUE ...]"
    parser.description = f"{parser.description or 'train a SigLIP (or CLIP) model'}\n\n{HELP_EXAMPLES}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in config_fields()}
    config = load_config(args.config, overrides)
    try:
        train(config)
    except TrainingDiverged:
        return 3            # the one-line reason is already on stderr (rank 0 printed it as the run stopped)
    return 0
