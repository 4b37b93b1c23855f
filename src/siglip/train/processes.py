"""Where a training process sits: one process, or one rank of a torchrun job (gloo on the CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from siglip.errors import UserError


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


def store_of_this_attempt(world_size: int) -> dist.Store | None:
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
        store = store_of_this_attempt(world_size)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        started = True
    if world_size > 1:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank, device=where, started_group=started)
