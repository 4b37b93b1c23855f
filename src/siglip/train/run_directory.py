"""The output directory of a `siglip train` run: created or refused, metrics appended, checkpoints written.

    DIR/metrics.jsonl     one JSON row per logged step (rows past the last checkpoint are dropped on resume)
    DIR/tensorboard/      the same rows for TensorBoard
    DIR/checkpoints/      resumable checkpoints (siglip.checkpoint), every rank's RNG state gathered to rank 0
    DIR/processor/        the run's tokenizer and image processor, saved once and read by every rank
    DIR/decoder/          the SigLIP 2 recipe's decoder, beside final/ (siglip.siglip2.decoder_files)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from siglip import checkpoint as ckpt
from siglip.errors import UserError
from siglip.train.config import RESUMABLE_CHANGES, TrainConfig, upgrade_config_dict
from siglip.train.processes import Processes


class RunDirectory:
    """The --out directory of one run as one process sees it: checkpoints, metrics, TensorBoard, and the counts of
    bad samples and of captions cut short."""

    def __init__(self, config: TrainConfig, processes: Processes):
        self.config = config
        self.processes = processes
        self.out = Path(config.out)
        self.checkpoints = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.bad_base: Counter[str] = Counter()       # bad samples counted before this process started (global)
        self.bad_local: Counter[str] = Counter()      # bad samples this process met since it started (this rank)
        self.truncated_base = 0                       # captions cut short before this process started (global)
        self.truncated_local = 0                      # captions cut short in this process's batches (this rank)
        self.rows: list[dict[str, Any]] = []
        self.writer = None

    # ---- the run directory

    def prepare_directory(self) -> Path | None:
        """Create --out, refuse to mix runs, clear it for --overwrite; return the checkpoint to resume from."""
        config, out = self.config, self.out
        previous = [name for name in ("checkpoints", "final", "metrics.jsonl", "processor", "decoder")
                    if (out / name).exists()]
        if self.processes.is_main:
            if previous and not config.resume:
                if not config.overwrite:
                    raise UserError(
                        f"--out {out} already holds a run ({', '.join(previous)}); pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out"
                    )
                for name in ("checkpoints", "final", "processor", "tensorboard", "decoder"):
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

    def totals(self) -> tuple[Counter[str], int]:
        """Bad samples skipped by kind, and captions cut short, over all ranks and restarts (a collective: every
        rank must call it; the restored counts of earlier processes are added on rank 0 only)."""
        main = self.processes.is_main
        bad, truncated = (Counter(self.bad_base), self.truncated_base) if main else (Counter(), 0)
        local = {"bad": dict(self.bad_local), "truncated": self.truncated_local}
        gathered: list[Any] = [local]
        if self.processes.world_size > 1:
            gathered = [None] * self.processes.world_size
            dist.all_gather_object(gathered, local)
        for counts in gathered:
            bad.update(counts["bad"])
            truncated += counts["truncated"]
        return bad, truncated

    # ---- checkpoints

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, samples_seen: int,
             trained_seconds: float, guard_state: dict[str, int],
             extra_state: dict[str, torch.Tensor] | None = None) -> None:
        """Checkpoint on rank 0, with every rank's RNG states gathered to it (a collective).

        guard_state: the divergence guard's counts (siglip.train.guard.DivergenceGuard.state).
        extra_state: tensors saved beside the model's in its state file, under names of their own (the SigLIP 2
            recipe's "siglip2.*": siglip.train.recipe.Recipe.state_dict).
        """
        processes = self.processes
        rng = ckpt.capture_rng_state()
        if processes.world_size > 1:
            gathered: list[Any] = [None] * processes.world_size if processes.is_main else None
            dist.gather_object(rng, gathered, dst=0)
        else:
            gathered = [rng]
        bad, truncated = self.totals()
        if processes.is_main:
            ckpt.save_checkpoint(
                self.checkpoints, step, model_state={**model.state_dict(), **(extra_state or {})},
                optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(), rng_states=gathered,
                state={"config": asdict(self.config), "samples_seen": samples_seen, "trained_seconds": trained_seconds,
                       "bad_samples": dict(bad), "truncated_captions": truncated, **guard_state,
                       "world_size": processes.world_size,
                       "data": {"source": self.config.data, "seed": self.config.seed, "next_step": step}},
                keep=self.config.keep_checkpoints,
            )
        processes.barrier()


PLOT_FILES = ("loss.png", "scale_bias.png", "pairs.png")


def check_resumable(config: TrainConfig, checkpoint: ckpt.Checkpoint) -> None:
    saved = upgrade_config_dict(checkpoint.state.get("config", {}))
    current = asdict(config)
    changed = [f"{name}: {saved[name]!r} in the checkpoint, {current[name]!r} now" for name in current
               if name in saved and name not in RESUMABLE_CHANGES and saved[name] != current[name]]
    if changed:
        raise UserError(
            f"cannot resume {checkpoint.path} with a different configuration ({'; '.join(changed)}); give the "
            "original values or start a new run in another --out"
        )
