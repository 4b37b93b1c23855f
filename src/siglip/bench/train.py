"""`siglip bench train`: peak memory and time of one training step, with and without `--micro-batch`, in one run.

For a model preset at contrastive batch B, each configuration (the full batch, then each micro-batch size M) runs
in its own fresh worker process, so that one configuration's peak cannot hide inside another's. The worker builds
the preset and AdamW exactly as `siglip train` does (its default hyper-parameters), makes random inputs (pixels
drawn from a standard normal, token ids uniform over the vocabulary: the cost of a step does not depend on what
the images show, and random data has no duplicate captions, so the labels are the diagonal), and runs `--steps`
training steps of `siglip.train.step.forward_backward` (forward, sigmoid loss, backward; in micro-batches when M is
given), gradient clipping and the optimiser update. `--lock-image` freezes the image tower as `siglip train
--lock-image` does (LiT: no gradients, no optimiser state for it).

- ``ms``: the median time of those steps (the first one included; ``first_ms`` is that first step alone, which
  also allocates the optimiser's state).
- ``peak_mem_mb`` (MiB): on the CPU, the growth of the worker's peak resident set (VmHWM, reset through
  /proc/self/clear_refs after the imports) over the resident set after its imports: parameters, gradients, AdamW's
  two moments, the inputs and the step's activations, everything the step touches. On CUDA,
  torch.cuda.max_memory_allocated over the whole worker (the towers run under bfloat16 autocast, as in training).
- A configuration that runs out of memory is reported as such, not as a crash: on the CPU the worker caps its
  address space (RLIMIT_AS) at 85% of the memory available when it starts (or at `--memory-limit`), so an
  allocation beyond that fails inside PyTorch instead of waking the kernel's OOM killer; on CUDA the worker
  catches torch.cuda.OutOfMemoryError. A worker that dies anyway is reported with its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from siglip.bench.record import publish, write_marked_section
from siglip.errors import UserError

if TYPE_CHECKING:
    import torch

MIB = 1 << 20
GIB = 1 << 30
MEMORY_HEADROOM = 0.85
"""Fraction of the memory available at the worker's start that its address space may grow by (CPU)."""

DOC_BEGIN = "<!-- siglip bench train: begin (written by `siglip bench train --markdown`; do not edit by hand) -->"
DOC_END = "<!-- siglip bench train: end -->"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `siglip bench train`."""
    parser.add_argument("--preset", default="small", help="model preset of siglip.model.PRESETS (default small)")
    parser.add_argument("--batch-size", type=int, default=4096, help="contrastive batch B (default 4096)")
    parser.add_argument("--micro-batch", default="256",
                        help="comma-separated micro-batch sizes M, each measured beside the full batch (default 256)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in pixels, a multiple of the preset's patch size (default: the preset's)")
    parser.add_argument("--text-length", type=int, default=16, help="tokens per caption (default 16, the paper's)")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="tokenizer vocabulary; sets the size of the token embedding (default 32000)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration (default 2)")
    parser.add_argument("--lock-image", action="store_true",
                        help="freeze the image tower, as `siglip train --lock-image` (LiT) does")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu or cuda (default cpu)")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                        help="CPU only: let a worker grow by at most this many GiB (default: 85%% of the memory "
                             "available when it starts); a configuration that needs more is reported out of memory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the random inputs (default 0)")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]} instead of a table')
    parser.add_argument("--markdown", metavar="FILE",
                        help="write the table into FILE, between the markers of a previous run if FILE has them, "
                             "otherwise appended at its end")


def _random_pixels(preset: str, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, S, S) random images, or for a NaFlex preset their packed patches (n, 1 + P, 3 p^2): every image square
    at the full budget P = (S / p)^2, the most work the budget allows."""
    import torch

    from siglip.model import PRESETS, pack_patches

    spec = PRESETS[preset]
    if not spec.naflex:
        return torch.randn(n, 3, size, size, generator=generator)
    side = size // spec.patch_size
    patches = torch.randn(n, side * side, 3 * spec.patch_size ** 2, generator=generator)
    return torch.stack([pack_patches(image, (side, side)) for image in patches])


def run(args: argparse.Namespace) -> int:
    """Measure the full batch and each micro-batch size, one fresh worker each; print a table or JSON."""
    from siglip.model import PRESETS

    if args.preset not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    micro_batches = parse_micro_batches(args.micro_batch)
    for name in ("batch_size", "text_length", "vocab_size", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise UserError(f"--batch-size must be at least 2 (a contrastive batch needs negatives), got {args.batch_size}")
    patch = PRESETS[args.preset].patch_size
    image_size = args.image_size or PRESETS[args.preset].image_size
    if image_size < patch or image_size % patch:
        raise UserError(f"--image-size {image_size} does not fit preset {args.preset!r}: use a multiple of its patch "
                        f"size {patch}")
    if args.memory_limit is not None and args.memory_limit <= 0:
        raise UserError(f"--memory-limit must be a positive number of GiB, got {args.memory_limit}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device here; run on a GPU machine or use --device cpu")

    started = time.perf_counter()
    load = [os.getloadavg()[0]]
    rows = []
    for micro_batch in [None, *micro_batches]:
        config = {"preset": args.preset, "batch_size": args.batch_size, "micro_batch": micro_batch,
                  "image_size": image_size, "text_length": args.text_length, "vocab_size": args.vocab_size,
                  "steps": args.steps, "device": args.device, "seed": args.seed, "lock_image": args.lock_image,
                  "memory_limit": None if args.memory_limit is None else int(args.memory_limit * GIB)}
        rows.append(_run_worker(config))
        load.append(os.getloadavg()[0])
        label = "full batch" if micro_batch is None else f"micro-batch {micro_batch}"
        print(f"siglip bench train: {label} done after {time.perf_counter() - started:.0f} s", file=sys.stderr)

    result = publish(rows, device=args.device, command=command_line(args), load=load, started=started,
                     as_json=args.json, table=format_table(rows))
    if args.markdown:
        write_markdown(result, Path(args.markdown))
    return 0


def parse_micro_batches(text: str) -> list[int]:
    """"256,512" -> [256, 512]; "" or "none" -> [] (the full batch alone)."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--micro-batch must be comma-separated positive integers, got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise UserError(f"--micro-batch sizes must be positive, got {text!r}")
    return sizes


def command_line(args: argparse.Namespace) -> str:
    """The `siglip bench train` command that reproduces this run, every setting spelled out."""
    parts = ["siglip bench train", f"--preset {args.preset}", f"--batch-size {args.batch_size}",
             f"--micro-batch {args.micro_batch.replace(' ', '')}"]
    if args.image_size is not None:
        parts.append(f"--image-size {args.image_size}")
    parts += [f"--text-length {args.text_length}", f"--vocab-size {args.vocab_size}", f"--steps {args.steps}",
              f"--device {args.device}"]
    if args.lock_image:
        parts.append("--lock-image")
    if args.memory_limit is not None:
        parts.append(f"--memory-limit {args.memory_limit:g}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Output


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one line per configuration."""
    header = (f"{'preset':<7} {'B':>6} {'micro':>6} {'image':>6} {'ms/step':>10} {'first ms':>10} {'samples/s':>10} "
              f"{'peak MiB':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        start = (f"{r['preset']:<7} {r['batch_size']:>6} {r['micro_batch'] or '-':>6} {r['image_size']:>6} ")
        if r.get("skipped"):
            lines.append(start + r["skipped"])
        else:
            lines.append(start + f"{r['ms']:>10.0f} {r['first_ms']:>10.0f} {r['samples_per_s']:>10.1f} "
                                 f"{r['peak_mem_mb']:>10.0f}")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The measured table in markdown, with the machine, the command and the load during the run."""
    low, high = result["load_average"]
    lines = [
        f"Machine: {result['machine']}. One-minute load average between {low:.1f} and {high:.1f} during the run; the "
        f"run took {result['seconds']} s.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| preset | B | micro-batch | image | parameters | ms / step | first step ms | samples/s | peak memory MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        start = (f"| {r['preset']} | {r['batch_size']} | {r['micro_batch'] or 'none (full batch)'} | "
                 f"{r['image_size']} | ")
        if r.get("skipped"):
            parameters = f"{r['parameters']:,}" if r.get("parameters") else ""
            lines.append(start + f"{parameters} | {r['skipped']} | | | |")
        else:
            lines.append(start + f"{r['parameters']:,} | {r['ms']:.0f} | {r['first_ms']:.0f} | "
                                 f"{r['samples_per_s']:.1f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def write_markdown(result: dict, path: Path) -> None:
    """Write the table into `path` between DOC_BEGIN and DOC_END when the file has both, else append it."""
    write_marked_section(path, DOC_BEGIN, DOC_END, markdown_table(result), title="Training-step benchmark")


# ---------------------------------------------------------------------------------------------------------------
# The worker: one process per configuration


def _run_worker(config: dict) -> dict:
    """Run one configuration in a fresh process; its last stdout line is the JSON row."""
    command = [sys.executable, "-m", "siglip.bench.train", "--worker"]
    done = subprocess.run(command, input=json.dumps(config), stdout=subprocess.PIPE, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        killed = done.returncode in (-9, 137)
        reason = f"worker exited with status {done.returncode}" + (" (killed: out of memory?)" if killed else "")
        return _row(config, skipped=reason)
    return json.loads(lines[-1])


def _row(config: dict, **values) -> dict:
    row = {name: config[name] for name in ("preset", "batch_size", "micro_batch", "image_size", "text_length",
                                           "vocab_size", "steps", "device", "lock_image")}
    row.update({"ms": None, "first_ms": None, "samples_per_s": None, "peak_mem_mb": None, "parameters": None})
    row.update(values)
    return row


def worker_main(config: dict) -> dict:
    """Build the preset and AdamW, run `steps` training steps on random inputs, return the measured row."""
    import torch

    from siglip.bench.memory import peak_rss, reset_peak_rss
    from siglip.model import build_model
    from siglip.optim import build_optimizer
    from siglip.train.config import TrainConfig
    from siglip.train.step import ContrastiveTowers, forward_backward

    device = torch.device(config["device"])
    n, micro_batch, steps = config["batch_size"], config["micro_batch"], config["steps"]
    defaults = TrainConfig()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None     # as siglip train on CUDA
    limit = None
    if device.type == "cpu":
        # Start the thread pools before the cap: a thread's stack is address space too, and OpenMP aborts the
        # process (no exception to catch) when it cannot create its threads under the cap.
        torch.ones(256, 256) @ torch.ones(256, 256)
        torch.ones(1 << 20).add_(1.0)
        baseline = reset_peak_rss()
        limit = _limit_address_space(config["memory_limit"])
    else:
        torch.cuda.reset_peak_memory_stats(device)
    parameters = None
    step = 0
    try:
        torch.manual_seed(config["seed"])
        model = build_model(config["preset"], vocab_size=config["vocab_size"], max_text_length=config["text_length"],
                            image_size=config["image_size"], init_logit_scale=defaults.init_logit_scale,
                            init_logit_bias=defaults.init_logit_bias).to(device).train()
        parameters = sum(parameter.numel() for parameter in model.parameters())
        if config["lock_image"]:
            model.vision_model.requires_grad_(False).eval()
        towers = ContrastiveTowers(model, lock_image=config["lock_image"])
        optimizer, scheduler = build_optimizer(
            model, lr=defaults.lr, weight_decay=defaults.weight_decay, beta1=defaults.beta1, beta2=defaults.beta2,
            logit_lr_multiplier=defaults.logit_lr_multiplier, warmup_steps=defaults.warmup_steps,
            total_steps=defaults.steps, min_lr_ratio=defaults.min_lr_ratio)
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        generator = torch.Generator().manual_seed(config["seed"])
        size = config["image_size"]
        pixel_values = _random_pixels(config["preset"], n, size, generator).to(device)
        # Ids 2 and up: no pad (0) and no end token (1), so every row uses all L positions.
        input_ids = torch.randint(2, config["vocab_size"], (n, config["text_length"]), generator=generator).to(device)
        times = []
        while step < steps:
            step += 1                                   # named in the out-of-memory message
            _synchronize(device)
            start = time.perf_counter()
            forward_backward(towers, pixel_values, input_ids, None, loss="sigmoid", micro_batch=micro_batch,
                             autocast_dtype=autocast_dtype)
            torch.nn.utils.clip_grad_norm_(trainable, defaults.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _synchronize(device)
            times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as error:       # torch reports a failed allocation as RuntimeError
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not _is_out_of_memory(error, message):
            raise
        where = f"at step {step}" if step else "while building the model and inputs"
        if device.type == "cpu":
            reached = f"{(peak_rss() - baseline) / GIB:.1f} GiB resident"
            reached += f" of a {limit / GIB:.1f} GiB limit" if limit is not None else ""
        else:
            reached = f"{torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB allocated"
        # PyTorch's CPU message starts with a source location; keep what it says.
        detail = message.split("DefaultCPUAllocator: ")[-1].split(". Error code")[0]
        return _row(config, parameters=parameters,
                    skipped=f"out of memory {where}: {reached} ({detail[:120]})")
    if device.type == "cpu":
        peak = peak_rss() - baseline
    else:
        peak = torch.cuda.max_memory_allocated(device)
    ms = statistics.median(times) * 1000
    return _row(config, ms=round(ms, 1), first_ms=round(times[0] * 1000, 1), parameters=parameters,
                samples_per_s=round(n / (ms / 1000), 2), peak_mem_mb=round(peak / MIB, 1),
                times_ms=[round(t * 1000, 1) for t in times])


def _limit_address_space(extra: int | None) -> int | None:
    """Cap this process's address space at its current size plus `extra` bytes (default: 85% of the memory
    available now); returns the allowed growth, or None where no cap can be set."""
    import resource

    from siglip.bench.memory import status_bytes
    from siglip.train.feature_cache import available_memory_bytes

    if extra is None:
        available = available_memory_bytes()
        if available is None:
            return None
        extra = int(MEMORY_HEADROOM * available)
    try:
        current = status_bytes("VmSize")
        resource.setrlimit(resource.RLIMIT_AS, (current + extra, resource.RLIM_INFINITY))
    except (OSError, ValueError, RuntimeError):
        return None
    return extra


def _is_out_of_memory(error: BaseException, message: str) -> bool:
    if isinstance(error, MemoryError):
        return True
    lowered = message.lower()
    return any(words in lowered for words in ("out of memory", "can't allocate", "cannot allocate", "bad_alloc",
                                              "failed to allocate"))


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    print(json.dumps(worker_main(json.loads(sys.stdin.read()))))
