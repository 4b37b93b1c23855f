"""`siglip train`: the training loop. It wires parts defined elsewhere and defines none of them.

    configuration (siglip.train_config: TrainConfig, YAML and flags, validation)
    -> one step's forward and backward (siglip.train_step: towers, loss, micro-batches)

    data (siglip.data) -> tokenizer and processor (siglip.tokenizer) -> SiglipModel (siglip.model)
    -> loss (siglip.loss: sigmoid through the tiled kernel or the ring, softmax through an all-gather)
    -> AdamW with warm-up and cosine decay (siglip.optim) -> checkpoints and the final export (siglip.checkpoint)
    -> evaluation (siglip.evaluate), metrics.jsonl, TensorBoard, plots (siglip.plots)

Several processes (torchrun): each rank loads its own contiguous slice of the global batch, the sigmoid loss runs
the ring over the default group, and DistributedDataParallel averages the gradients. The losses return each rank's
share normalised by its local batch, so that average is exactly the gradient of the global-batch loss.

SigLiT (`--lock-image --cache-image-features`): the frozen image tower embeds each image once, the first time a
batch holds it; later batches look the embedding up by sample key (siglip.feature_cache) and run only the text tower.

Resuming (`--resume`) restores the model, optimiser, scheduler, data position and RNG states of the newest
checkpoint; on the CPU a resumed run ends bitwise equal to an uninterrupted one (tests/test_train.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from siglip import checkpoint as ckpt
from siglip.errors import UserError

# Tests and users import TrainConfig, load_config, validate_config, upgrade_config_dict, PairTransform,
# ContrastiveTowers and forward_backward from siglip.train: they stay importable from here.
from siglip.train_config import (
    RESUMABLE_CHANGES,
    TrainConfig,
    add_config_arguments,
    config_fields,
    load_config,
    upgrade_config_dict,
    validate_config,
)
from siglip.train_step import ContrastiveTowers, PairTransform, forward_backward, frozen_image_encoder

if TYPE_CHECKING:
    from siglip.feature_cache import ImageFeatureCache

# ------------------------------------------------------------------------------------------------ processes


@dataclass
class Processes:
    """Where this process sits: rank, world size, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    started_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The group the losses reduce over: the default group under torchrun, None on one process."""
        return dist.group.WORLD if self.world_size > 1 else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _store_of_this_attempt(world_size: int) -> dist.Store | None:
    """torchrun's store, seen under a prefix naming this restart; None outside torchrun's agent store.

    torchrun (torch 2.13, where this was diagnosed) keeps one store server for the whole job and its workers join it
    without a prefix, so after a restart a worker can read the address a dead worker of the previous attempt left
    there, try to connect to it and fail ("connectFullMesh ... Connection refused"), which uses up a restart. A
    prefix per attempt keeps each attempt to its own keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    from torch.distributed.constants import default_pg_timeout

    # The client torch's env:// set-up would make (the agent hosts the server), with the same timeout.
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                           timeout=default_pg_timeout)
    return dist.PrefixStore(f"siglip/attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", client)


def start_processes(device: str) -> Processes:
    """Join the torchrun job if there is one (WORLD_SIZE > 1): gloo on the CPU, nccl on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was given but torch sees no CUDA device; use --device cpu")
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    started = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if where.type == "cuda" else "gloo"
        store = _store_of_this_attempt(world_size)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        started = True
    if world_size > 1:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank, device=where, started_group=started)


# ------------------------------------------------------------------------------------------------ the run


class Run:
    """State and helpers of one training run (one per process)."""

    def __init__(self, config: TrainConfig, processes: Processes):
        self.config = config
        self.processes = processes
        self.out = Path(config.out)
        self.checkpoints = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.bad_base: Counter[str] = Counter()       # bad samples counted before this process started (global)
        self.bad_local: Counter[str] = Counter()      # bad samples this process met since it started (this rank)
        self.rows: list[dict[str, Any]] = []
        self.writer = None

    # ---- the run directory

    def prepare_directory(self) -> Path | None:
        """Create --out, refuse to mix runs, clear it for --overwrite; return the checkpoint to resume from."""
        config, out = self.config, self.out
        previous = [name for name in ("checkpoints", "final", "metrics.jsonl", "processor") if (out / name).exists()]
        if self.processes.is_main:
            if previous and not config.resume:
                if not config.overwrite:
                    raise UserError(
                        f"--out {out} already holds a run ({', '.join(previous)}); pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out"
                    )
                for name in ("checkpoints", "final", "processor", "tensorboard"):
                    shutil.rmtree(out / name, ignore_errors=True)
                for name in ("metrics.jsonl", "summary.json", *PLOT_FILES):
                    with contextlib.suppress(FileNotFoundError):
                        (out / name).unlink()
            out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.checkpoints)
            ckpt.remove_stale_temporaries(out)
        self.processes.barrier()
        return ckpt.latest_checkpoint(self.checkpoints) if config.resume else None

    # ---- metrics

    def open_logs(self, start_step: int) -> None:
        """Keep the metrics rows up to `start_step` (a killed run may have logged past its last checkpoint)."""
        if not self.processes.is_main:
            return
        kept = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):     # a line cut short by a kill
                    row = json.loads(line)
                    if row.get("step", 0) <= start_step:
                        kept.append(row)
        temporary = self.metrics_path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        os.replace(temporary, self.metrics_path)
        self.rows = kept
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=start_step + 1)

    def log(self, row: dict[str, Any]) -> None:
        if not self.processes.is_main:
            return
        self.rows.append(row)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, row["step"])
        self.writer.flush()

    def bad_totals(self) -> Counter[str]:
        """Bad samples skipped by kind, over all ranks and restarts (a collective: every rank must call it)."""
        totals = Counter(self.bad_base) if self.processes.is_main else Counter()
        if self.processes.world_size > 1:
            gathered: list[Any] = [None] * self.processes.world_size
            dist.all_gather_object(gathered, dict(self.bad_local))
            for counts in gathered:
                totals.update(counts)
        else:
            totals.update(self.bad_local)
        return totals


PLOT_FILES = ("loss.png", "scale_bias.png", "pairs.png")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training as `config` says and write its outputs into config.out (see CONTRACT.md).

    Returns the final metrics: step, loss, logit_scale, logit_bias, the last evaluation ("zeroshot", "retrieval"),
    bad samples skipped by kind, and wall_time_s.
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

    run = Run(config, processes)
    resume_from = run.prepare_directory()
    checkpoint = ckpt.load_checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        _check_resumable(config, checkpoint)

    _seed_everything(config.seed)
    model, processor, source = _model_processor_source(config, run)
    held_out = HeldOut(source)
    if config.lock_image:
        model.vision_model.requires_grad_(False)
    if config.loss == "softmax":
        # The softmax is invariant to a shift of every logit: b receives no gradient, so it is not trained.
        model.logit_bias.requires_grad_(False)
    model.to(processes.device)

    from siglip.optim import build_optimizer

    optimizer, scheduler = build_optimizer(
        model, lr=config.lr, weight_decay=config.weight_decay, beta1=config.beta1, beta2=config.beta2,
        logit_lr_multiplier=config.logit_lr_multiplier, warmup_steps=config.warmup_steps,
        total_steps=config.steps, min_lr_ratio=config.min_lr_ratio,
    )
    step, samples_seen, trained_seconds = 0, 0, 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model_state)
        optimizer.load_state_dict(checkpoint.optimizer_state)
        scheduler.load_state_dict(checkpoint.scheduler_state)
        step = checkpoint.step
        samples_seen = int(checkpoint.state.get("samples_seen", 0))
        trained_seconds = float(checkpoint.state.get("trained_seconds", 0.0))
        run.bad_base.update(checkpoint.state.get("bad_samples", {}))
        rank_rng = checkpoint.rng_states[processes.rank] if processes.rank < len(checkpoint.rng_states) else None
        if rank_rng is not None:
            ckpt.restore_rng_state(rank_rng)
        else:
            _seed_everything(config.seed * 1000 + processes.rank + step)
        if processes.is_main:
            print(f"siglip train: resumed from {checkpoint.path} (step {step} of {config.steps})", flush=True)
    del checkpoint

    run.open_logs(step)
    towers: nn.Module = ContrastiveTowers(model, lock_image=config.lock_image)
    if processes.world_size > 1:
        towers = nn.parallel.DistributedDataParallel(
            towers, device_ids=[processes.device.index] if processes.device.type == "cuda" else None
        )
    local_batch = config.batch_size // processes.world_size
    autocast_dtype = torch.bfloat16 if processes.device.type == "cuda" else None
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (processes.is_main and config.progress))
    last_eval: dict[str, Any] = {}
    row: dict[str, Any] = {}
    loader = None
    transform = PairTransform(processor)
    cache = _image_feature_cache(config, source, transform, step, local_batch, processes)
    encode_new_images = (frozen_image_encoder(model, processes.device, config.micro_batch, autocast_dtype)
                         if cache is not None else None)
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
            loss = forward_backward(towers, pixel_values, input_ids, positive_ids, loss=config.loss,
                                    group=processes.group, micro_batch=config.micro_batch,
                                    autocast_dtype=autocast_dtype, image_features=image_features)
            grad_norm = (nn.utils.clip_grad_norm_(trainable, config.grad_clip) if config.grad_clip > 0 else None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples_seen += config.batch_size
            window_steps += 1
            run.bad_local.update(batch.bad)
            trained_seconds += time.perf_counter() - step_start
            bar.update(1)

            evaluate_now = config.evaluation and (
                step == config.steps or (config.eval_every > 0 and step % config.eval_every == 0))
            if step % config.log_every == 0 or step == config.steps or evaluate_now:
                if processes.world_size > 1:
                    dist.all_reduce(loss)
                    loss /= processes.world_size
                elapsed = time.perf_counter() - window_start
                row = _train_row(model, step, loss, lr, grad_norm, window_steps * config.batch_size / elapsed,
                                 samples_seen, run.bad_totals())
                if evaluate_now:
                    last_eval = _evaluate(model, processor, held_out, config, processes)
                    row.update(_flatten_eval(last_eval))
                    _set_train_mode(model, config.lock_image)
                run.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", t=f"{row['logit_scale']:.2f}",
                                b=f"{row['logit_bias']:.2f}", samples_s=f"{row['samples_per_s']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if step == config.steps or (config.checkpoint_every > 0 and step % config.checkpoint_every == 0):
                _save(run, model, optimizer, scheduler, step, samples_seen, trained_seconds)
    finally:
        bar.close()
        del loader

    if not row:
        # Resumed a finished run: nothing trained, so evaluate the restored model again for the summary.
        if config.evaluation:
            last_eval = _evaluate(model, processor, held_out, config, processes)
        scale, bias = _scale_and_bias(model)
        row = {"step": step, "logit_scale": scale, "logit_bias": bias}
    bad = dict(run.bad_totals())
    result: dict[str, Any] = {}
    if processes.is_main:
        ckpt.export_final(model, processor, run.out / "final")
        result = {
            "step": step, "loss": row.get("loss"), "logit_scale": row["logit_scale"],
            "logit_bias": row["logit_bias"], **last_eval, "bad_samples": bad,
            "trained_seconds": trained_seconds, "wall_time_s": time.perf_counter() - started,
        }
        if config.plots:
            _draw_plots(run, model, processor, held_out, config)
        (run.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(summary_table(config, result), flush=True)
        run.writer.close()
    processes.barrier()
    return result


# ------------------------------------------------------------------------------------------------ step helpers


def _model_processor_source(config: TrainConfig, run: Run) -> tuple[nn.Module, Any, Any]:
    """The model, its processor and the training source.

    A fresh run trains the tokenizer once, on rank 0, from the source's caption corpus, and saves the processor in
    --out/processor, which every other rank and every resumption loads: all of them tokenise alike.
    """
    from transformers import AutoProcessor

    from siglip.data import open_source
    from siglip.model import PRESETS, build_model, load_model
    from siglip.tokenizer import build_processor, train_tokenizer

    processes = run.processes
    processor_dir = run.out / "processor"
    model = None
    if config.init is not None:
        model, processor = load_model(config.init)
        image_size = _image_size(model)
    elif config.model not in PRESETS:
        raise UserError(f"--model {config.model!r} is not a preset; choose one of {', '.join(PRESETS)}")
    else:
        image_size = config.image_size or PRESETS[config.model].image_size
    source = open_source(config.data, split="train", seed=config.seed, strict=config.strict,
                         classes_file=config.classes, templates_file=config.templates, image_size=image_size)

    if processes.is_main and not processor_dir.exists():
        if model is None:
            tokenizer = train_tokenizer(source.caption_corpus(config.tokenizer_captions),
                                        vocab_size=config.vocab_size, max_length=config.max_text_length,
                                        seed=config.seed)
            processor = build_processor(tokenizer, image_size=image_size)
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


def _image_size(model: nn.Module) -> int:
    return int(model.config.vision_config.image_size)


def _image_feature_cache(config: TrainConfig, source: Any, transform: PairTransform, step: int, local_batch: int,
                         processes: Processes) -> ImageFeatureCache | None:
    """The cache of a --cache-image-features run (None otherwise), sized for the most distinct images this rank
    can meet in the remaining steps: steps x local batch, and never more than the source holds."""
    if not config.cache_image_features:
        return None
    if transform.augments_images:
        raise UserError("--cache-image-features cannot be used with random image augmentation: a cached embedding "
                        "would freeze one augmented view of each image; drop --cache-image-features")
    from siglip.feature_cache import ImageFeatureCache

    size = source.__len__()
    capacity = max(1, (config.steps - step) * local_batch)
    if size is None:
        if processes.is_main:
            print(f"siglip train: {config.data} is an endless source whose images never repeat: "
                  "--cache-image-features only costs memory here", file=sys.stderr, flush=True)
    else:
        capacity = min(capacity, size)
    return ImageFeatureCache(capacity)


def _set_train_mode(model: nn.Module, lock_image: bool) -> None:
    model.train()
    if lock_image:
        model.vision_model.eval()     # a frozen tower keeps its inference behaviour (dropout off)


def _scale_and_bias(model: nn.Module) -> tuple[float, float]:
    from siglip.model import scale_and_bias

    scale, bias = scale_and_bias(model)
    return float(scale.detach().reshape(())), float(bias.detach().reshape(()))


def _train_row(model: nn.Module, step: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor | None,
               samples_per_s: float, samples_seen: int, bad: Counter[str]) -> dict[str, Any]:
    scale, bias = _scale_and_bias(model)
    row = {"step": step, "loss": float(loss), "logit_scale": scale, "logit_bias": bias, "lr": lr,
           "samples_per_s": samples_per_s, "samples_seen": samples_seen, "bad_samples": sum(bad.values())}
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    row.update({f"bad/{kind}": count for kind, count in sorted(bad.items())})
    return row


def _evaluate(model: nn.Module, processor: Any, source: Any, config: TrainConfig, processes: Processes) -> dict:
    """Zero-shot (when the source has tasks) and retrieval on the held-out split, on rank 0; {} on the others."""
    results: dict[str, Any] = {}
    if processes.is_main and source.test_samples():
        from siglip.evaluate import evaluate

        model.eval()
        tasks = ["zeroshot", "retrieval"] if source.tasks else ["retrieval"]
        for task in tasks:
            results[task] = evaluate(model, processor, source, task, batch_size=config.eval_batch_size,
                                     device=str(processes.device))
    processes.barrier()
    return results


class HeldOut:
    """A source whose held-out split is read once and kept: evaluation asks for it at every evaluation."""

    def __init__(self, source: Any):
        self.source = source
        self._samples: list | None = None

    def test_samples(self) -> list:
        if self._samples is None:
            self._samples = self.source.test_samples()
        return self._samples

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)


def _flatten_eval(results: dict[str, Any]) -> dict[str, float]:
    """{"zeroshot": {...}, "retrieval": {...}} -> flat metric names such as zeroshot/color/accuracy."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            if key == "per_task":
                for name, per in value.items():
                    flat.update({f"{task}/{name}/{k}": v for k, v in per.items() if isinstance(v, (int, float))})
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{task}/{key}"] = value
    return flat


def _save(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
          samples_seen: int, trained_seconds: float) -> None:
    """Checkpoint on rank 0, with every rank's RNG states gathered to it (a collective)."""
    processes = run.processes
    rng = ckpt.capture_rng_state()
    if processes.world_size > 1:
        gathered: list[Any] = [None] * processes.world_size if processes.is_main else None
        dist.gather_object(rng, gathered, dst=0)
    else:
        gathered = [rng]
    bad = run.bad_totals()
    if processes.is_main:
        ckpt.save_checkpoint(
            run.checkpoints, step, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict(), rng_states=gathered,
            state={"config": asdict(run.config), "samples_seen": samples_seen, "trained_seconds": trained_seconds,
                   "bad_samples": dict(bad), "world_size": processes.world_size,
                   "data": {"source": run.config.data, "seed": run.config.seed, "next_step": step}},
            keep=run.config.keep_checkpoints,
        )
    processes.barrier()


def _check_resumable(config: TrainConfig, checkpoint: ckpt.Checkpoint) -> None:
    saved = upgrade_config_dict(checkpoint.state.get("config", {}))
    current = asdict(config)
    changed = [f"{name}: {saved[name]!r} in the checkpoint, {current[name]!r} now" for name in current
               if name in saved and name not in RESUMABLE_CHANGES and saved[name] != current[name]]
    if changed:
        raise UserError(
            f"cannot resume {checkpoint.path} with a different configuration ({'; '.join(changed)}); give the "
            "original values or start a new run in another --out"
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ reporting


def summary_table(config: TrainConfig, result: dict[str, Any]) -> str:
    """The end-of-run table: zero-shot accuracy per task against chance, retrieval R@1, t, b, bad samples, time."""
    lines = [
        "",
        f"siglip train: {config.init or config.model} on {config.data}, {result['step']} steps of batch "
        f"{config.batch_size}, {config.loss} loss -> {Path(config.out) / 'final'}",
    ]
    zeroshot = result.get("zeroshot")
    if zeroshot:
        lines.append(f"  {'zero-shot task':<16}{'accuracy':>10}{'chance':>10}{'x chance':>10}")
        for name, per in zeroshot["per_task"].items():
            ratio = per["accuracy"] / per["chance"] if per["chance"] else float("nan")
            lines.append(f"  {name:<16}{per['accuracy']:>10.1%}{per['chance']:>10.1%}{ratio:>10.1f}")
        lines.append(f"  (held-out split, {zeroshot['n']} images)")
    retrieval = result.get("retrieval")
    if retrieval:
        lines.append(f"  retrieval R@1: image->text {retrieval['image_to_text_r1']:.1%}, "
                     f"text->image {retrieval['text_to_image_r1']:.1%} ({retrieval['n']} pairs)")
    lines.append(f"  final t = {result['logit_scale']:.3g}, b = {result['logit_bias']:.3g}")
    bad = result.get("bad_samples") or {}
    skipped = ", ".join(f"{kind} {count}" for kind, count in sorted(bad.items())) if bad else "none"
    lines.append(f"  bad samples skipped: {skipped}")
    lines.append(f"  wall time {result['wall_time_s']:.1f} s (training steps {result['trained_seconds']:.1f} s)")
    return "\n".join(lines)


def _draw_plots(run: Run, model: nn.Module, processor: Any, source: Any, config: TrainConfig) -> None:
    from siglip import plots

    plots.plot_loss(run.rows, run.out / "loss.png")
    plots.plot_scale_bias(run.rows, run.out / "scale_bias.png")
    probabilities, captions = pair_probabilities(model, processor, source, config, count=16)
    if captions:
        title = ("sigmoid(t <x, y> + b)" if config.loss == "sigmoid" else "softmax over texts of t <x, y>")
        plots.plot_pairs(probabilities, captions, run.out / "pairs.png", title=f"held-out pairs: {title}")


def pair_probabilities(model: nn.Module, processor: Any, source: Any, config: TrainConfig,
                       count: int = 16) -> tuple[torch.Tensor, list[str]]:
    """(k, k) pair probabilities of up to `count` held-out samples, and their captions.

    The samples differ in their labels (for shapes: one image per held-out colour-shape pair, and one per count),
    or, for a source without labels, in their captions; so a caption is true of its own image only, and the
    diagonal is the right answer. Sigmoid models: sigmoid(t <x_i, y_j> + b), each pair judged alone as SigLIP
    does. Softmax models: the row-wise softmax of t <x_i, y_j>, since their bias is meaningless.
    """
    from siglip.model import encode_images, encode_texts

    chosen, seen = [], set()
    for sample in source.test_samples():
        key = tuple(sorted(sample.labels.items())) if sample.labels else sample.caption
        if key not in seen:
            seen.add(key)
            chosen.append(sample)
        if len(chosen) == count:
            break
    if not chosen:
        return torch.empty(0, 0), []
    transform = PairTransform(processor)
    encoded = [transform(sample) for sample in chosen]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        images = encode_images(model, torch.stack([e["pixel_values"] for e in encoded]).to(device)).float()
        texts = encode_texts(model, torch.stack([e["input_ids"] for e in encoded]).to(device)).float()
        scale, bias = _scale_and_bias(model)
        logits = scale * images @ texts.T
        probabilities = torch.sigmoid(logits + bias) if config.loss == "sigmoid" else logits.softmax(dim=1)
    return probabilities.cpu(), [sample.caption for sample in chosen]


# ------------------------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--batch-size for batch_size, ...) plus --config FILE.yaml
    (siglip.train_config)."""
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in config_fields()}
    config = load_config(args.config, overrides)
    train(config)
    return 0

