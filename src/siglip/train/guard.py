"""The divergence guard of `siglip train`: skip an update whose loss or gradient norm is not finite, and stop a run
whose updates keep failing.

A long run meets the occasional non-finite loss (one batch that overflows, a spike) and recovers when that one
update is skipped; a run that has diverged fails at every step from then on. So, as large-scale trainers do:

- an update whose loss (on any rank) or global gradient norm is not finite is skipped: the weights, the optimiser's
  moments and its step count stay as they were, while the step, the data position and the learning-rate schedule
  move on as for any update. Skipped updates are counted (`skipped_updates` in metrics.jsonl and the summary);
- after `max_consecutive` skipped updates in a row the run stops with `TrainingDiverged`: a one-line message (the
  step, the newest checkpoint, what to try) and exit status 3;
- no checkpoint is written while updates are being skipped, and none from a state that holds a non-finite value
  (`holds_non_finite`): every checkpoint is one a run can continue from.

Under torchrun the ranks agree with one all-reduce of two numbers a step (`agree_on_update`): the loss, summed for
the log, and the number of ranks that saw a non-finite value. So every rank skips the same updates, and no rank
waits in a collective that another rank left.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class TrainingDiverged(Exception):
    """A run stopped because its updates kept failing; str() is the one-line message for stderr."""


def agree_on_update(loss: torch.Tensor, grad_norm: torch.Tensor, world_size: int) -> tuple[bool, torch.Tensor]:
    """Whether every rank's loss and the gradient norm are finite, and the mean loss over ranks (a 0-d tensor).

    A collective under torchrun (every rank must call it, once a step): one all-reduce of a 2-element tensor on the
    loss's device.
    """
    finite_here = torch.isfinite(loss.detach()).all() & torch.isfinite(grad_norm.detach()).all()
    numbers = torch.stack([loss.detach().float().reshape(()), (~finite_here).float().to(loss.device)])
    if world_size > 1:
        dist.all_reduce(numbers)
    return bool(numbers[1].item() == 0), numbers[0] / world_size


class DivergenceGuard:
    """Counts skipped updates, over the whole run (restored on resume), and says when a run has diverged."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        """Updates skipped since the run began."""
        self.consecutive = 0
        """Updates skipped in a row, up to the last one."""

    def record(self, finite: bool) -> None:
        if finite:
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1

    @property
    def diverged(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state(self) -> dict[str, int]:
        """What a checkpoint keeps, so that a resumed run counts on."""
        return {"skipped_updates": self.skipped, "consecutive_skips": self.consecutive}

    def load_state(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped_updates", 0))
        self.consecutive = int(state.get("consecutive_skips", 0))

    def message(self, step: int, checkpoint: Path | None) -> str:
        """The one-line reason a run stopped at `step` (updates done), with the checkpoint to go back to."""
        if checkpoint is None:
            newest = "none was written"
        else:
            newest = str(checkpoint)
        return (f"stopped at step {step}: the last {self.consecutive} updates had a non-finite loss or gradient "
                f"norm and were skipped (the run diverged; {self.skipped} skipped in all); newest good checkpoint: "
                f"{newest}; try a lower --lr, a longer --warmup-steps or --grad-clip 1.0, in a new --out")


def holds_non_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether a parameter, buffer or optimiser tensor holds a non-finite value.

    The guard keeps non-finite updates out, so this is False in a working run; checked before every checkpoint, it
    keeps a checkpoint from ever holding such a value should one arise some other way (an overflow of finite values
    in the optimiser). Every rank holds the same weights and optimiser state, so every rank reaches the same verdict.
    """
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [value for state in optimizer.state.values() for value in state.values()
                if isinstance(value, torch.Tensor)]
    checks = [torch.isfinite(tensor).all() for tensor in tensors if tensor.is_floating_point()]
    return bool(checks) and not bool(torch.stack(checks).all())


def non_finite_state_message(step: int) -> str:
    return (f"stopped at step {step}: the weights or the optimiser state hold a non-finite value, so no checkpoint "
            "was written; try a lower --lr, a longer --warmup-steps or --grad-clip 1.0, in a new --out")


def grad_clip_norm(grad_clip: float) -> float:
    """The max_norm for torch.nn.utils.clip_grad_norm_: grad_clip, or infinity (a factor of 1, which still returns
    the norm that the guard reads) when clipping is off."""
    return grad_clip if grad_clip > 0 else math.inf
