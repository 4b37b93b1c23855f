"""Resumable checkpoints, written atomically and read without unpickling anything; the final Hugging Face export.

One checkpoint is a directory DIR/checkpoints/step_00001200/ holding:

    model.safetensors      the model's state dict
    optimizer.safetensors  every tensor of the optimiser state, keyed "<param index>.<name>" (exp_avg, ...)
    rng.safetensors        the torch RNG states of every rank ("rank0.cpu", "rank0.cuda", ...)
    state.json             the rest, as plain JSON: step, config, data position, scheduler, the optimiser's
                           param groups and scalar state, Python and NumPy RNG states, counters, and the SHA-256
                           of each file above

Safety: nothing here calls pickle. Weights and tensors are read by the safetensors parser (a JSON header and raw
bytes) and everything else by `json`, so a checkpoint swapped for a pickle with a payload is refused, never run.

Atomicity: a checkpoint is written into a hidden `.tmp-*` directory, each file and the directory are fsynced, and
the directory is renamed to its final name (rename is atomic on POSIX) before the parent is fsynced. A process
killed mid-write leaves only the temporary directory, which readers ignore; the previous checkpoint is untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from siglip.errors import UserError

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
STATE_FILE = "state.json"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted or read: modified, truncated, or not in this project's format."""


@dataclass
class Checkpoint:
    """A checkpoint read back into memory.

    model_state: parameter name -> tensor (on the CPU).
    optimizer_state: a state dict for `torch.optim.Optimizer.load_state_dict`.
    scheduler_state: a state dict for `torch.optim.lr_scheduler.LRScheduler.load_state_dict`.
    rng_states: one entry per rank that saved it (see `capture_rng_state`).
    state: everything else the trainer stored (step, config, data position, counters).
    path: the directory it was read from.
    """

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_states: list[dict[str, Any]]
    state: dict[str, Any]
    path: Path
    step: int = field(init=False)

    def __post_init__(self) -> None:
        self.step = int(self.state["step"])


# ----------------------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """This process's random states: Python, NumPy, torch CPU and (where present) the current CUDA device.

    Returns a dict of JSON-able values plus torch uint8 tensors under "cpu" and "cuda".
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    rng = {
        "python": [version, list(internal), gauss_next],
        "numpy": [bit_generator, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Undo `capture_rng_state`: the process draws the same random numbers as the one that captured it."""
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    bit_generator, keys, position, has_gauss, cached_gaussian = rng["numpy"]
    np.random.set_state((bit_generator, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


# ----------------------------------------------------------------------------------------------------- writing


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after `step` updates; zero-padded so names sort like steps."""
    return f"step_{step:08d}"


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write the checkpoint of `step` into `directory` atomically; return its path.

    Args:
        directory: the run's checkpoint directory (created if missing).
        step: updates completed; the checkpoint is named `checkpoint_name(step)`. An existing checkpoint of the
            same step is replaced (atomically: the old one is moved aside first, then deleted).
        model_state: `model.state_dict()`; tensors are copied to the CPU.
        optimizer_state, scheduler_state: the `state_dict()` of each.
        rng_states: `capture_rng_state()` of each rank, in rank order.
        state: JSON-able trainer state (config, data position, counters); "step" is added.
        keep: if given, delete all but the newest `keep` checkpoints afterwards.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    temporary = directory / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()

    optimizer_tensors, optimizer_json = _split_optimizer_state(optimizer_state)
    rng_tensors, rng_json = {}, []
    for rank, rng in enumerate(rng_states):
        rng_json.append({key: value for key, value in rng.items() if not isinstance(value, torch.Tensor)})
        for key, value in rng.items():
            if isinstance(value, torch.Tensor):
                rng_tensors[f"rank{rank}.{key}"] = value.detach().cpu().contiguous()

    tensor_files = {
        "model.safetensors": {name: _cpu_copy(value) for name, value in model_state.items()},
        "optimizer.safetensors": optimizer_tensors,
        "rng.safetensors": rng_tensors,
    }
    digests = {}
    for name, tensors in tensor_files.items():
        path = temporary / name
        save_file(tensors, str(path))
        _fsync(path)
        digests[name] = _sha256(path)

    document = {
        "format": FORMAT_VERSION,
        **state,
        "step": int(step),
        "optimizer": optimizer_json,
        "scheduler": _jsonable(scheduler_state),
        "rng": rng_json,
        "sha256": digests,
    }
    _write_text(temporary / STATE_FILE, json.dumps(document, indent=1, sort_keys=True))
    _fsync(temporary)

    if final.exists():
        _remove_directory(final)
    os.replace(temporary, final)
    _fsync(directory)
    if keep is not None:
        prune_checkpoints(directory, keep)
    return final


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` (>= 1) checkpoints of `directory`; return the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the newest checkpoint is what --resume reads), got {keep}")
    doomed = list_checkpoints(directory)[:-keep]
    for path in doomed:
        _remove_directory(path)
    return doomed


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the `.tmp-*` and `.trash-*` directories left by a process killed while writing or deleting."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [path for path in directory.iterdir() if path.name.startswith((".tmp-", ".trash-"))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# ----------------------------------------------------------------------------------------------------- reading


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of `directory` (those with a state file), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of `directory`, or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`, checking each file against its recorded SHA-256.

    Raises:
        CheckpointError: a file is missing, does not match its digest, or is not safetensors/JSON (for instance a
            pickle: it is refused without being unpickled).
    """
    path = Path(path)
    state_path = path / STATE_FILE
    try:
        document = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}; it is incomplete: delete it") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{state_path} is not JSON ({error}); checkpoints are never unpickled: delete {path} and resume from "
            "an earlier checkpoint"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path} is not a siglip checkpoint of format {FORMAT_VERSION} "
            f"(found format {document.get('format') if isinstance(document, dict) else type(document).__name__})"
        )

    tensors = {}
    for name in TENSOR_FILES:
        file_path = path / name
        if not file_path.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; delete it and resume from an earlier one")
        expected = document.get("sha256", {}).get(name)
        if _sha256(file_path) != expected:
            raise CheckpointError(
                f"{file_path} does not match the SHA-256 recorded in {STATE_FILE}: it was modified or truncated "
                f"after it was written; refusing to load it (delete {path} to resume from an earlier checkpoint)"
            )
        tensors[name] = _load_safetensors(file_path, map_location)

    rng_states = []
    for rank, rng in enumerate(document.pop("rng")):
        prefix = f"rank{rank}."
        rng.update({key[len(prefix):]: value for key, value in tensors["rng.safetensors"].items()
                    if key.startswith(prefix)})
        rng["cpu"] = rng["cpu"].cpu()
        rng_states.append(rng)
    optimizer_state = _join_optimizer_state(tensors["optimizer.safetensors"], document.pop("optimizer"))
    scheduler_state = document.pop("scheduler")
    document.pop("sha256")
    return Checkpoint(
        model_state=tensors["model.safetensors"],
        optimizer_state=optimizer_state,
        scheduler_state=scheduler_state,
        rng_states=rng_states,
        state=document,
        path=path,
    )


# ----------------------------------------------------------------------------------------------------- final export


def export_final(model: torch.nn.Module, processor: Any, directory: str | os.PathLike) -> Path:
    """Write `model` and `processor` in Hugging Face format to `directory`, replacing it atomically.

    The result holds config.json, model.safetensors and the tokenizer and processor files, so that
    `transformers.AutoModel.from_pretrained(directory)` and the zero-shot-image-classification pipeline load it.
    The model keeps its class (`SiglipModel`, or `Siglip2Model` for NaFlex) and its tokenizer; the text config
    carries the tokenizer's own special-token ids. A tokenizer of ours (left padding, attention mask) is saved
    with `model_max_length` = the 64-position table, so that transformers' usual call, `processor(text=...,
    padding="max_length")`, places a caption where training placed it: the embeddings of training, as the
    pipeline's 64-token call gives them too. Google's tokenizers are saved as they came.

    Replacing: the new export is written beside `directory` and exchanged with it in one atomic rename where the
    system offers one (Linux renameat2 RENAME_EXCHANGE), so a reader always finds a whole `directory`, old or
    new; elsewhere the old one is renamed aside just before the new one is renamed in.
    """
    from siglip.model import record_tokenizer_conventions

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    from transformers.utils import logging as hf_logging

    record_tokenizer_conventions(model, processor.tokenizer)
    tokenizer, trained_length = processor.tokenizer, processor.tokenizer.model_max_length
    if tokenizer.padding_side == "left" and "attention_mask" in tokenizer.model_input_names:
        tokenizer.model_max_length = model.config.text_config.max_position_embeddings
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # tokenizer.json would keep the padding and truncation of the last call (training's 16 tokens), which a
        # processor(text=...) call of transformers then applies instead of model_max_length. The wrapper sets
        # both again at each call, so clearing them changes nothing for this process.
        backend.no_padding()
        backend.no_truncation()
    # transformers draws a "writing shards" bar and, on saving, checks its own default SiglipTextConfig (whose
    # token ids lie outside its vocabulary) and warns about it: noise after a training run, so both are muted.
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        model.save_pretrained(str(temporary), safe_serialization=True)
        processor.save_pretrained(str(temporary))
    finally:
        tokenizer.model_max_length = trained_length
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    for file_path in temporary.rglob("*"):
        if file_path.is_file():
            _fsync(file_path)
    _fsync(temporary)
    if directory.exists() and _exchange(temporary, directory):
        shutil.rmtree(temporary)                          # now holds the previous export
    else:
        if directory.exists():
            aside = directory.parent / f".trash-{directory.name}-{os.getpid()}"
            os.replace(directory, aside)                  # the shortest window this system allows
            os.replace(temporary, directory)
            shutil.rmtree(aside)
        else:
            os.replace(temporary, directory)
    _fsync(directory.parent)
    return directory


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing directories in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the
    system or file system does not offer it."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_current_directory, rename_exchange = -100, 2          # AT_FDCWD, RENAME_EXCHANGE from <fcntl.h>, <stdio.h>
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    status = renameat2(at_current_directory, os.fsencode(first), at_current_directory, os.fsencode(second),
                       rename_exchange)
    return status == 0


# ----------------------------------------------------------------------------------------------------- helpers


def _split_optimizer_state(optimizer_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimiser state -> (tensors keyed "<param index>.<name>", the JSON-able remainder)."""
    tensors, scalars = {}, {}
    for index, parameter_state in optimizer_state["state"].items():
        scalars[str(index)] = {}
        for name, value in parameter_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = _cpu_copy(value)
            else:
                scalars[str(index)][name] = value
    return tensors, {"param_groups": _jsonable(optimizer_state["param_groups"]), "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(index): dict(values) for index, values in document["scalars"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = document["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({error}); checkpoints are never unpickled, so a pickle or "
            "a damaged file is refused: delete its checkpoint and resume from an earlier one"
        ) from None


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous copy: safetensors refuses tensors that share storage (tied weights, views).
    return tensor.detach().to("cpu", copy=True).contiguous()


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively; refuse anything JSON cannot hold exactly (tensors, objects)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint's JSON state: {value!r}")


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    # On a directory this makes its entries (new names, renames) durable; without it a crash could forget a rename.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_directory(path: Path) -> None:
    # Rename first, so a half-deleted directory never carries a name that a reader would take for complete.
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    os.replace(path, trash)
    shutil.rmtree(trash)
