"""`siglip bench ring`: the distributed losses side by side, in gloo processes on this machine.

For each world size D it starts D processes joined by gloo and, on the same random shards, runs one forward and
backward of each implementation: the sigmoid rings of `siglip.ring` ("two_pass", "bidirectional", "single_lap"),
the sigmoid loss over an all-gather ("sigmoid_all_gather") and CLIP's softmax loss over an all-gather
("softmax_all_gather"). Per implementation it reports:

- ms (and forward_ms, backward_ms): forward plus backward, the slowest rank's time of each repeat, median over
  repeats; the implementations take turns within each repeat, so load from elsewhere falls on all of them alike;
- peak_mem_mb: the largest rank's growth of its peak resident set (VmHWM) over one forward plus backward, after
  resetting the peak through /proc/self/clear_refs; glibc's mmap threshold is pinned at 128 KiB in the workers so
  every tensor larger than that is returned to the system when freed and the figure follows the live tensors;
- bytes each rank sent in the forward and in the backward pass, and its synchronisation points, as counted by the
  implementation itself (`siglip.collectives.CommStats`).

`run_local_world` (the process launcher) is shared with the tests.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

from siglip.bench.memory import peak_rss, pin_malloc, reset_peak_rss
from siglip.errors import UserError

IMPLS = ("two_pass", "bidirectional", "single_lap", "sigmoid_all_gather", "softmax_all_gather")
DTYPES = ("float32", "float64", "bfloat16", "float16")
MMAP_THRESHOLD = 128 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `siglip bench ring`."""
    parser.add_argument("--world-sizes", default="2,4,8", help="comma-separated numbers of processes (default 2,4,8)")
    parser.add_argument("--local-batch", type=int, default=512, help="pairs per rank, n (default 512)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width d (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (default 5)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="feature dtype (default float32)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a world is stopped (default 600)")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]} instead of a table')


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table, or one JSON object with --json. Returns the exit status."""
    world_sizes = _parse_world_sizes(args.world_sizes)
    impls = _parse_impls(args.impls)
    for name in ("local_batch", "dim", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    rows = []
    for world in world_sizes:
        config = dict(n=args.local_batch, d=args.dim, dtype=args.dtype, repeats=args.repeats, impls=impls,
                      seed=args.seed)
        per_rank = run_local_world(world, _bench_rank, (config,), timeout_s=args.timeout)
        rows += _combine(per_rank, world, config)
        if not args.json:
            print(f"world size {world} done", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"rows": rows}))
    else:
        print(format_table(rows))
    return 0


def format_table(rows: list[dict]) -> str:
    """A plain-text table of benchmark rows."""
    header = ("impl", "D", "global B", "ms", "fwd ms", "bwd ms", "peak MB", "fwd MB sent", "bwd MB sent",
              "syncs f/b", "loss")
    lines = [header]
    for row in rows:
        lines.append((
            row["impl"], str(row["world_size"]), str(row["global_batch"]), f"{row['ms']:.1f}",
            f"{row['forward_ms']:.1f}", f"{row['backward_ms']:.1f}",
            f"{row['peak_mem_mb']:.2f}", f"{row['forward_bytes_per_rank'] / 2**20:.3f}",
            f"{row['backward_bytes_per_rank'] / 2**20:.3f}",
            f"{row['forward_sync_points']}/{row['backward_sync_points']}", f"{row['loss']:.6f}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = zip(line, widths, strict=True)
        out.append("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(cells)))
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def run_local_world(world_size: int, target, args: tuple = (), timeout_s: float = 120.0) -> list:
    """Run `target(rank, world_size, *args)` in `world_size` processes joined by gloo; return each rank's result.

    The processes start from a fork server that has imported torch once (much faster than a fresh interpreter per
    rank), share the cores evenly (torch threads = cores // world_size, at least 1), and meet through a file store
    in a fresh temporary directory, so no port is claimed. `target` must be a module-level function and its result
    picklable. A rank that raises fails the whole call with that rank's traceback; a world that has not finished
    after `timeout_s` is terminated (its processes only) and TimeoutError raised.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "siglip.ring"])
    threads = max(1, (os.cpu_count() or 1) // world_size)
    results = context.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="siglip-world-") as tmp:
        store = str(Path(tmp) / "store")
        processes = [
            context.Process(
                target=_rank_main, daemon=True,
                args=(rank, world_size, store, threads, timeout_s, target, args, results),
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        collected: dict[int, tuple[bool, object]] = {}
        try:
            while len(collected) < world_size:
                if not results.empty():
                    rank, ok, value = results.get()
                    collected[rank] = (ok, value)
                    continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"a world of {world_size} ranks did not finish within {timeout_s:.0f} s")
                if any(p.exitcode not in (None, 0) for p in processes) and results.empty():
                    dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and r not in collected]
                    if dead:
                        raise RuntimeError(f"ranks {dead} of a world of {world_size} died without reporting")
                time.sleep(0.01)
        finally:
            for process in processes:
                process.join(timeout=10 if len(collected) == world_size else 0.1)
                if process.is_alive():
                    process.terminate()
                    process.join(timeout=5)
    failures = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(collected.items()) if not ok]
    if failures:
        raise RuntimeError("\n".join(failures))
    return [collected[rank][1] for rank in range(world_size)]


def _rank_main(rank, world_size, store, threads, timeout_s, target, args, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            value = target(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, which reports it
        results.put((rank, False, traceback.format_exc()))


def _bench_rank(rank: int, world: int, config: dict) -> dict:
    """One rank's measurements of every implementation on its shard."""
    import torch
    import torch.distributed as dist

    from siglip import ring
    from siglip.collectives import CommStats
    from siglip.softmax import gathered_softmax_loss

    pin_malloc(MMAP_THRESHOLD)
    dtype = getattr(torch, config["dtype"])
    n, d = config["n"], config["d"]
    generator = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1).to(dtype).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1).to(dtype).requires_grad_()
    t = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)

    def step(impl: str, stats: CommStats | None = None) -> tuple[float, float, float]:
        """One forward and backward; returns (loss, forward seconds, backward seconds)."""
        for leaf in (x, y, t, b):
            leaf.grad = None
        start = time.perf_counter()
        if impl == "softmax_all_gather":
            loss = gathered_softmax_loss(x, y, t, dist.group.WORLD, stats=stats)
        else:
            name = "all_gather" if impl == "sigmoid_all_gather" else impl
            loss = ring.ring_sigmoid_loss(x, y, t, b, dist.group.WORLD, implementation=name, stats=stats)
        middle = time.perf_counter()
        loss.backward()
        return float(loss.detach()), middle - start, time.perf_counter() - middle

    impls = config["impls"]
    out = {impl: dict(forward=[], backward=[]) for impl in impls}
    for impl in impls:
        step(impl)                                      # warm-up: first-call allocations and connections
        dist.barrier()
        baseline = reset_peak_rss()
        stats = CommStats()
        loss, _, _ = step(impl, stats)
        out[impl].update(loss=loss, peak_bytes=peak_rss() - baseline, stats=vars(stats))
    # Round robin, starting one later each round, so that load from elsewhere on the machine falls on every
    # implementation alike instead of on whichever ran during it.
    for round_index in range(config["repeats"]):
        for k in range(len(impls)):
            impl = impls[(round_index + k) % len(impls)]
            dist.barrier()
            _, forward, backward = step(impl)
            out[impl]["forward"].append(forward)
            out[impl]["backward"].append(backward)
    return out


def _combine(per_rank: list[dict], world: int, config: dict) -> list[dict]:
    rows = []
    for impl in config["impls"]:
        ranks = [result[impl] for result in per_rank]
        # A step takes as long as its slowest rank: max over ranks for each repeat, then the median over repeats.
        def slowest(key, ranks=ranks):
            return [max(r[key][k] for r in ranks) for k in range(config["repeats"])]

        forward, backward = slowest("forward"), slowest("backward")
        total = [f + b for f, b in zip(forward, backward, strict=True)]
        stats = ranks[0]["stats"]
        rows.append(dict(
            impl=impl, world_size=world, local_batch=config["n"], global_batch=world * config["n"], dim=config["d"],
            dtype=config["dtype"], ms=1e3 * statistics.median(total),
            forward_ms=1e3 * statistics.median(forward), backward_ms=1e3 * statistics.median(backward),
            peak_mem_mb=max(r["peak_bytes"] for r in ranks) / 2**20,
            forward_bytes_per_rank=max(r["stats"]["forward_bytes"] for r in ranks),
            backward_bytes_per_rank=max(r["stats"]["backward_bytes"] for r in ranks),
            forward_sync_points=stats["forward_sync_points"], backward_sync_points=stats["backward_sync_points"],
            loss=sum(r["loss"] for r in ranks) / world,
        ))
    return rows


def _parse_world_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--world-sizes must be comma-separated integers such as 2,4,8, got {text!r}") from None
    if not sizes or any(size < 2 for size in sizes):
        raise UserError(f"--world-sizes needs integers of at least 2 (a ring of one has nothing to pass), got {text!r}")
    return sizes


def _parse_impls(text: str) -> list[str]:
    impls = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [impl for impl in impls if impl not in IMPLS]
    if not impls or unknown:
        raise UserError(f"--impls must be a comma-separated subset of {','.join(IMPLS)}, got {text!r}")
    return impls
