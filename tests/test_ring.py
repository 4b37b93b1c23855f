"""The losses across ranks (siglip.ring) against the float64 reference of the global batch, on gloo.

One world of four processes is started once for the whole file; inside it the groups {0}, {0, 1}, {0, 1, 2} and all
four ranks give world sizes 1 to 4. Every rank runs every check of the groups it belongs to and reports each result
by name; the tests below read those reports. Inputs are drawn fresh for each run from one seed, printed, which
SIGLIP_TEST_SEED replays (as for every test, tests/conftest.py). Every call names its kernel: float64 runs on
"torch", float32 and 16-bit on each CPU kernel that builds here.
"""

from __future__ import annotations

import argparse
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import _fresh_seed
from reference import (
    CPU_BACKENDS,
    assert_close,
    label_matrix,
    peak_allocated_bytes,
    pin_mmap_threshold,
    reference_sigmoid_loss,
    reference_softmax_loss,
    require_backend,
    tolerance,
)
from siglip import ring
from siglip.bench.ring import run_local_world
from siglip.collectives import CommStats
from siglip.loss import SigmoidLoss, sigmoid_loss, softmax_loss
from siglip.softmax import gathered_softmax_loss

pytestmark = pytest.mark.dist

WORLD = 4
SIGMOID_RINGS = ("two_pass", "bidirectional", "single_lap", "all_gather")
ID_PATTERNS = ("distinct", "equal", "clusters")
# Tolerances, as a fraction of each result's scale (`reference.error_ratio`), as (loss, x and y gradients, t and b
# gradients) per dtype: the largest error measured over fresh draws of these checks, every ring, world size and CPU
# kernel (`.venv/bin/python scripts/measure_tolerances.py --minutes 35`: 6 rounds), times about 10, except the 16-bit
# feature gradients, rounded to their dtype on the way out (at most 2^-8 of the largest entry for bfloat16, 2^-11 for
# float16) and held to two to four times the largest error measured; CLIP's gathered loss rounds them twice (the
# gathered gradient, then the reduced one), hence its own bfloat16 entry. Largest errors measured, in the same order:
TOLERANCES = {
    torch.float64: (5e-15, 1e-14, 5e-15),         # 4.4e-16, 1.0e-15, 5.6e-16
    torch.float32: (2e-6, 4e-6, 3e-6),            # 2.0e-7, 3.6e-7, 1.7e-7
    torch.bfloat16: (2e-6, 1e-2, 3e-6),           # 1.9e-7, 3.3e-3, 1.8e-7
    torch.float16: (2e-6, 2e-3, 3e-6),            # 1.7e-7, 4.4e-4, 2.1e-7
}
SOFTMAX_BFLOAT16_TOLERANCES = (2e-6, 1.5e-2, 2e-6)  # 1.8e-7, 7.4e-3, 1.2e-7


def _backends() -> tuple[str, ...]:
    """The CPU kernels that run here (the fused one is built, or loaded, before the ranks start)."""
    from siglip.kernels import cpu_fused

    try:
        cpu_fused.load()
        return CPU_BACKENDS
    except cpu_fused.KernelUnavailable:
        return ("torch",)


BACKENDS = _backends()


@pytest.fixture(scope="module")
def reports() -> dict[str, list]:
    """name of a check -> list of (rank, error or None) over the ranks that ran it; ["seed"] -> the seed."""
    seed = _fresh_seed()
    print(f"test_ring world seed: SIGLIP_TEST_SEED={seed}")
    per_rank = run_local_world(WORLD, _run_checks, (seed, BACKENDS), timeout_s=300.0)
    merged: dict[str, list] = {"seed": seed}
    for rank, checks in enumerate(per_rank):
        for name, error in checks.items():
            merged.setdefault(name, []).append((rank, error))
    return merged


def _assert_reports(reports, prefix: str, expected_checks: int) -> None:
    seed = f"replay with SIGLIP_TEST_SEED={reports['seed']}"
    chosen = {name: results for name, results in reports.items() if name.startswith(prefix)}
    assert len(chosen) == expected_checks, f"{seed}: {len(chosen)} checks named '{prefix}...', expected " \
        f"{expected_checks}: {sorted(chosen)}"
    failures = [f"{name} on rank {rank}: {error}" for name, results in sorted(chosen.items())
                for rank, error in results if error is not None]
    assert not failures, f"{seed}:\n" + "\n".join(failures)


def test_sigmoid_rings_match_global_reference_float64(reports):
    # world sizes 2, 3, 4 x four implementations, plus world size 1 through the ring and through the local path
    _assert_reports(reports, "sigmoid float64 identity", 3 * len(SIGMOID_RINGS) + 2)


def test_sigmoid_rings_match_global_reference_float32(reports):
    _assert_reports(reports, "sigmoid float32 identity", 3 * len(SIGMOID_RINGS) * len(BACKENDS))


def test_sigmoid_rings_positive_ids_match_label_matrix_reference(reports):
    _assert_reports(reports, "sigmoid float64 ids", 3 * len(SIGMOID_RINGS) * len(ID_PATTERNS))


def test_sigmoid_rings_16bit(reports):
    _assert_reports(reports, "sigmoid 16-bit", 2 * len(SIGMOID_RINGS) * 2 * len(BACKENDS))


def test_softmax_all_gather_matches_global_reference(reports):
    # world sizes 2, 3, 4 x (float64, float32, three id patterns, bfloat16)
    _assert_reports(reports, "softmax", 3 * 6)


def test_traffic_counted_by_the_code_matches_the_cost_model(reports):
    # every sigmoid and softmax call at world sizes 2..4 above holds its CommStats to ring.expected_traffic
    _assert_reports(reports, "traffic", 3 * (len(SIGMOID_RINGS) * (2 + len(ID_PATTERNS)) + 5))


def test_two_pass_rings_scale_each_contribution_by_its_ranks_incoming_gradient(reports):
    # three rings with per-rank weights, two_pass with ids too, single_lap with one common weight, and two_pass's
    # second lap counted
    _assert_reports(reports, "weighted", 3 * 6)


def test_rings_under_no_grad_give_the_value_and_send_no_gradients(reports):
    _assert_reports(reports, "nograd", 3 * len(SIGMOID_RINGS) * 2)


def test_single_lap_backward_needs_no_peer(reports):
    _assert_reports(reports, "single_lap backward alone", 3)


def test_unequal_local_batches_raise_on_every_rank(reports):
    _assert_reports(reports, "disagreement", 3 * 7)


def test_ddp_step_equals_one_process_step_on_the_global_batch(reports):
    _assert_reports(reports, "ddp", 1 + 2 + 5)


def test_default_ring_memory_is_flat_in_the_world_size(reports):
    # each rank's peak of live tensors over one forward and backward, from the allocator's events, at D = 3 and 4
    _assert_reports(reports, "memory", len(MEMORY_IMPLS))


def test_cost_model_of_the_paper_setting():
    # B = 32k over D = 256 chips, d = 768, bfloat16: the sigmoid ring sends one tower, the softmax gather two.
    n, d = 32768 // 256, 768
    model = {impl: ring.expected_traffic(impl, 256, n, d, torch.bfloat16) for impl in SIGMOID_RINGS + ("softmax",)}
    total = {impl: stats.forward_bytes + stats.backward_bytes for impl, stats in model.items()}
    header = 255 * 8 * 7                                               # the agreement: seven int64 from each rank
    block, grad = n * d * 2, n * d * 4                                 # bfloat16 blocks, float32 gradients
    assert total["bidirectional"] == total["all_gather"] == header + 255 * (block + grad)
    assert abs((total["all_gather"] - header) / (total["softmax"] - header) - 0.5) < 1e-12
    assert model["single_lap"].backward_bytes == 0 and total["single_lap"] == header + 255 * (block + grad)
    # two_pass: the same lap, and in backward one float32 scalar from each rank (a second lap only if they differ)
    assert model["two_pass"].backward_bytes == 255 * 4
    differing = ring.expected_traffic("two_pass", 256, n, d, torch.bfloat16, equal_weights=False)
    assert differing.backward_bytes == 255 * 4 + 255 * (block + grad)
    assert model["bidirectional"].backward_bytes == 255 * grad          # float32 gradients, one hop each
    for impl in SIGMOID_RINGS + ("softmax",):
        no_grad = ring.expected_traffic(impl, 256, n, d, torch.bfloat16, with_grad=False)
        assert no_grad.backward_bytes == 0 and no_grad.backward_sync_points == 0


def test_cost_model_accepts_the_names_bench_ring_prints():
    from siglip.bench.ring import IMPLS

    for name in IMPLS:
        internal = {"sigmoid_all_gather": "all_gather", "softmax_all_gather": "softmax"}.get(name, name)
        assert vars(ring.expected_traffic(name, 4, 8, 16, torch.float32)) == vars(
            ring.expected_traffic(internal, 4, 8, 16, torch.float32))
    with pytest.raises(ValueError, match="implementation must be one of"):
        ring.expected_traffic("ring", 4, 8, 16, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# What runs inside each rank.


def random_ids(n: int, pattern: str, generator: torch.Generator) -> torch.Tensor:
    if pattern == "distinct":
        return torch.randperm(n, generator=generator) * 7 - 3
    if pattern == "equal":
        return torch.full((n,), 5)
    return torch.randint(0, max(1, n // 3), (n,), generator=generator)


def global_batch(generator, world, n, d, dtype, pattern=None):
    """The same global batch on every rank: (D n, d) features, t, b, ids or None."""
    x = F.normalize(torch.randn(world * n, d, generator=generator, dtype=torch.float64), dim=1).to(dtype)
    y = F.normalize(torch.randn(world * n, d, generator=generator, dtype=torch.float64), dim=1).to(dtype)
    t = torch.empty((), dtype=torch.float64).uniform_(1.0, 20.0, generator=generator)
    b = torch.empty((), dtype=torch.float64).uniform_(-10.0, 0.0, generator=generator)
    ids = None if pattern is None else random_ids(world * n, pattern, generator)
    return x, y, t, b, ids


def sigmoid_shares(x, y, t, b, ids, world, weights=None):
    """Literal float64 reference per rank: value S_r / n, and the gradients rank r should receive.

    With `weights` w_r, the gradients are those of sum_r w_r S_r / n for features (summed over every rank's share,
    as autograd would) and w_r dS_r/dt for t and b. Without, w_r = 1: D times the global gradient for features.
    """
    n = x.shape[0] // world
    weights = [1.0] * world if weights is None else weights
    leaves = [v.detach().double().clone().requires_grad_() for v in (x, y, t, b)]
    X, Y, T, B = leaves
    z = label_matrix(x.shape[0], image_ids=ids, text_ids=ids)
    logits = T * X @ Y.t() + B
    rows = -F.logsigmoid(z * logits).sum(dim=1)                       # (D n,) each image against all texts
    # |d loss / d logit| of each pair: the size of the terms that the t and b gradients sum (with cancellation)
    terms = torch.sigmoid(-z * logits).detach()
    similarity = (X @ Y.t()).abs().detach()
    shares = [rows[r * n:(r + 1) * n].sum() / n for r in range(world)]
    weighted = sum(w * s for w, s in zip(weights, shares, strict=True))
    gx, gy = torch.autograd.grad(weighted, (X, Y), retain_graph=True)
    out = []
    for r in range(world):
        gt, gb = torch.autograd.grad(weights[r] * shares[r], (T, B), retain_graph=True)
        part = slice(r * n, (r + 1) * n)
        magnitudes = {"t": abs(weights[r]) * (terms[part] * similarity[part]).sum() / n,
                      "b": abs(weights[r]) * terms[part].sum() / n}
        out.append((shares[r].detach(), gx[part], gy[part], gt, gb, magnitudes))
    total = reference_sigmoid_loss(x, y, t, b, positive_ids=ids)
    # float64 sums of the same terms in two orders: they agree to float64 rounding (measured up to 4.1e-16)
    assert_close(sum(s for s, *_ in out) / world, total, 5e-15, what="reference shares sum to the global loss")
    return out


def softmax_shares(x, y, t, ids, world, weights=None):
    """Literal float64 reference of CLIP's loss per rank: (this rank's image rows' CE + text rows' CE) / (2 n)."""
    n = x.shape[0] // world
    weights = [1.0] * world if weights is None else weights
    X, Y, T = (v.detach().double().clone().requires_grad_() for v in (x, y, t))
    logits = T * X @ Y.t()
    if ids is None:
        target = torch.eye(x.shape[0], dtype=torch.float64)
    else:
        target = (ids[:, None] == ids[None, :]).double()
    image_target, text_target = target / target.sum(1, keepdim=True), target.t() / target.t().sum(1, keepdim=True)
    image_rows = -(image_target * logits.log_softmax(1)).sum(1)
    text_rows = -(text_target * logits.t().log_softmax(1)).sum(1)
    # d loss / d t sums (softmax - target) * similarity over both directions: the size of those terms, per row
    similarity = (X @ Y.t()).abs().detach()
    image_terms = ((logits.softmax(1) - image_target).abs() * similarity).sum(1).detach()
    text_terms = ((logits.t().softmax(1) - text_target).abs() * similarity.t()).sum(1).detach()
    shares = [(image_rows[r * n:(r + 1) * n].sum() + text_rows[r * n:(r + 1) * n].sum()) / (2 * n)
              for r in range(world)]
    weighted = sum(w * s for w, s in zip(weights, shares, strict=True))
    gx, gy = torch.autograd.grad(weighted, (X, Y), retain_graph=True)
    out = []
    for r in range(world):
        (gt,) = torch.autograd.grad(weights[r] * shares[r], (T,), retain_graph=True)
        part = slice(r * n, (r + 1) * n)
        magnitudes = {"t": abs(weights[r]) * (image_terms[part].sum() + text_terms[part].sum()) / (2 * n)}
        out.append((shares[r].detach(), gx[part], gy[part], gt, magnitudes))
    total = reference_softmax_loss(x, y, t, positive_ids=ids)
    # float64 sums of the same terms in two orders: they agree to float64 rounding (measured up to 4.1e-16)
    assert_close(sum(s for s, *_ in out) / world, total, 5e-15, what="reference shares sum to the global loss")
    return out


def local_leaves(x, y, t, b, rank, n, dtype):
    """This rank's rows as leaves of `dtype`, t and b as float32 (float64 when dtype is float64) leaves."""
    scalar = torch.float64 if dtype == torch.float64 else torch.float32
    rows = slice(rank * n, (rank + 1) * n)
    return [x[rows].clone().requires_grad_(), y[rows].clone().requires_grad_(),
            t.to(scalar).clone().requires_grad_(), b.to(scalar).clone().requires_grad_()]


def compare(got_value, got_grads, want, dtype, what, tolerances=None):
    """want: (value, grads in the order x, y, t[, b], magnitudes of the t and b terms)."""
    label = f"{what} {str(dtype).split('.')[-1]}"
    tolerances = TOLERANCES[dtype] if tolerances is None else tolerances
    assert_close(got_value, want[0], tolerance(tolerances, "loss"), what=f"{label} loss")
    count, magnitudes = len(got_grads), want[-1]
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32         # as `local_leaves` makes t, b
    for name, got, expected in zip("xytb"[:count], got_grads, want[1:1 + count], strict=True):
        # Gradients are held to the largest entry: entries far below it carry its rounding (see test_loss.py).
        # The t and b gradients are sums over all pairs whose terms cancel, most near the balance point b moves
        # towards: the rounding of such a sum is a fraction of its terms' size, not of its result.
        assert_close(got, expected, tolerance(tolerances, name), scale=magnitudes.get(name, 0.0),
                     what=f"{label} grad {name}")
        assert got.dtype == (dtype if name in "xy" else scalar_dtype), f"{what} grad {name}: {got.dtype}"


def _run_checks(rank: int, world: int, seed: int, backends: tuple[str, ...]) -> dict[str, str | None]:
    """Every check of every group this rank belongs to; name -> None (passed) or the error text."""
    results: dict[str, str | None] = {}
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1 + rank)              # the few draws that differ by rank (disagreement checks)
    groups = {size: dist.new_group(list(range(size))) for size in (1, 2, 3)}
    groups[WORLD] = dist.group.WORLD

    def check(name, fn, *args):
        try:
            fn(*args)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported by name to the parent
            results[name] = traceback.format_exc(limit=4)

    # World size 1: the local path and the ring code with a group of one.
    x, y, t, b, _ = global_batch(generator, 1, 7, 5, torch.float64)
    if rank == 0:
        want = sigmoid_shares(x, y, t, b, None, 1)[0]
        for name, call in (
            ("local", lambda *a: sigmoid_loss(*a, chunk=3, backend="torch")),
            ("ring", lambda *a: ring.ring_sigmoid_loss(*a, groups[1], chunk=3, implementation="two_pass",
                                                       backend="torch")),
        ):
            def one(call=call):
                leaves = local_leaves(x, y, t, b, 0, 7, torch.float64)
                value = call(*leaves)
                value.backward()
                compare(value, [leaf.grad for leaf in leaves], want, torch.float64, "D=1")
            check(f"sigmoid float64 identity D=1 {name}", one)

    peaks: dict[tuple[str, int], int] = {}
    for size in (2, 3, WORLD):
        group = groups[size]
        member = rank < size
        if size in (3, WORLD):
            _memory_checks(rank, size, group, member, peaks)
        _sigmoid_checks(rank, size, group, member, generator, check, backends)
        _softmax_checks(rank, size, group, member, generator, check)
        _weighted_checks(rank, size, group, member, generator, check)
        _disagreement_checks(rank, size, group, member, check)
        _ddp_checks(rank, size, group, member, generator, check)
        dist.barrier()
    if rank < 3:                                    # members of both groups: D = 3 against D = 4
        for impl in MEMORY_IMPLS:
            check(f"memory D=3..4 {impl}", _assert_memory_growth, impl, peaks[impl, 3], peaks[impl, WORLD])
    return results


def _sigmoid_checks(rank, size, group, member, generator, check, backends):
    cases = [(torch.float64, None, "torch")] + [(torch.float32, None, backend) for backend in backends]
    cases += [(torch.float64, pattern, "torch") for pattern in ID_PATTERNS]
    cases += [(dtype, None, backend) for dtype in (torch.bfloat16, torch.float16) for backend in backends
              if size >= 3]
    for dtype, pattern, backend in cases:
        n, d = (6, 8) if dtype in (torch.float64, torch.float32) else (16, 32)
        x, y, t, b, ids = global_batch(generator, size, n, d, dtype, pattern)   # drawn on every rank alike
        if not member:
            continue
        want = sigmoid_shares(x.double(), y.double(), t, b, ids, size)[rank]
        local_ids = None if ids is None else ids[rank * n:(rank + 1) * n]
        label = ("16-bit " + str(dtype).split(".")[-1]) if dtype.itemsize == 2 else str(dtype).split(".")[-1]
        label += " identity" if pattern is None else f" ids {pattern}"
        for impl in SIGMOID_RINGS:
            name = f"{label} D={size} {impl}"
            leaves = local_leaves(x, y, t, b, rank, n, dtype)
            value = sigmoid_loss(*leaves, group, positive_ids=local_ids, chunk=4, ring=impl, backend=backend)
            value.backward()
            check(f"sigmoid {name} {backend}", compare, value, [leaf.grad for leaf in leaves], want, dtype, name)
            if dtype.itemsize != 2 and backend == backends[0]:
                # The same call once more through ring.py directly, counting what it sends.
                stats = CommStats()
                leaves = local_leaves(x, y, t, b, rank, n, dtype)
                ring.ring_sigmoid_loss(*leaves, group, positive_ids=local_ids, implementation=impl,
                                       stats=stats, backend=backend).backward()
                expected = ring.expected_traffic(impl, size, n, d, dtype, with_ids=ids is not None)
                check(f"traffic sigmoid {name}", _assert_traffic, stats, expected)


def _assert_traffic(stats: CommStats, expected: CommStats) -> None:
    assert vars(stats) == vars(expected), f"counted {vars(stats)}, cost model {vars(expected)}"


def _softmax_checks(rank, size, group, member, generator, check):
    cases = [(torch.float64, None), (torch.float32, None), (torch.bfloat16, None)]
    cases += [(torch.float64, pattern) for pattern in ID_PATTERNS]
    for dtype, pattern in cases:
        n, d = 5, 8
        x, y, t, b, ids = global_batch(generator, size, n, d, dtype, pattern)
        if not member:
            continue
        want = softmax_shares(x.double(), y.double(), t, ids, size)[rank]
        local_ids = None if ids is None else ids[rank * n:(rank + 1) * n]
        label = str(dtype).split(".")[-1] + ("" if pattern is None else f" ids {pattern}")
        leaves = local_leaves(x, y, t, b, rank, n, dtype)[:3]
        stats = CommStats()
        value = gathered_softmax_loss(*leaves, group, positive_ids=local_ids, stats=stats)
        public = softmax_loss(*leaves, group, positive_ids=local_ids)
        (value + public).backward()   # both paths together: twice the gradient of one
        grads = [leaf.grad / 2 for leaf in leaves]
        check(f"softmax {label} D={size}", compare, value, grads, want, dtype, f"softmax {label} D={size}",
              SOFTMAX_BFLOAT16_TOLERANCES if dtype == torch.bfloat16 else None)
        if dtype != torch.bfloat16:
            expected = ring.expected_traffic("softmax", size, n, d, dtype, with_ids=ids is not None)
            check(f"traffic softmax {label} D={size}", _assert_traffic, stats, expected)


def _weighted_checks(rank, size, group, member, generator, check):
    """Rank r back-propagates w_r times its loss: the two-pass rings route each w_r with its contribution."""
    n, d = 5, 6
    x, y, t, b, _ = global_batch(generator, size, n, d, torch.float64)
    ids = random_ids(size * n, "clusters", generator)          # drawn on every rank alike, members or not
    weights = [1.0 + 0.5 * r for r in range(size)]
    if not member:
        return
    want = sigmoid_shares(x, y, t, b, None, size, weights)[rank]
    for impl in ("two_pass", "bidirectional", "all_gather"):
        leaves = local_leaves(x, y, t, b, rank, n, torch.float64)
        value = sigmoid_loss(*leaves, group, ring=impl, backend="torch")
        (weights[rank] * value).backward()
        check(f"weighted D={size} {impl}", compare, value, [leaf.grad for leaf in leaves], want, torch.float64, impl)
    # the second lap carries the ids with the blocks, as the first does
    want_ids = sigmoid_shares(x, y, t, b, ids, size, weights)[rank]
    leaves = local_leaves(x, y, t, b, rank, n, torch.float64)
    value = sigmoid_loss(*leaves, group, ring="two_pass", positive_ids=ids[rank * n:(rank + 1) * n], backend="torch")
    (weights[rank] * value).backward()
    check(f"weighted D={size} two_pass ids", compare, value, [leaf.grad for leaf in leaves], want_ids, torch.float64,
          "two_pass ids")
    # two_pass learns in its backward pass that the weights differ, and recomputes in a second lap: counted
    stats = CommStats()
    value = ring.ring_sigmoid_loss(*local_leaves(x, y, t, b, rank, n, torch.float64), group,
                                   implementation="two_pass", stats=stats, backend="torch")
    (weights[rank] * value).backward()
    check(f"weighted D={size} two_pass second lap traffic", _assert_traffic, stats,
          ring.expected_traffic("two_pass", size, n, d, torch.float64, equal_weights=False))
    # Under torch.no_grad every ring gives the value and sends no gradient at all.
    plain = sigmoid_shares(x, y, t, b, None, size)[rank]
    for impl in SIGMOID_RINGS:
        stats = CommStats()
        with torch.no_grad():
            value = ring.ring_sigmoid_loss(*local_leaves(x, y, t, b, rank, n, torch.float64), group,
                                           implementation=impl, stats=stats, backend="torch")
        expected = ring.expected_traffic(impl, size, n, d, torch.float64, with_grad=False)
        check(f"nograd D={size} {impl} value", assert_close, value, plain[0], TOLERANCES[torch.float64][0])
        check(f"nograd D={size} {impl} traffic", _assert_traffic, stats, expected)

    # single_lap folds contributions in the forward pass: it honours one common weight on every rank.
    leaves = local_leaves(x, y, t, b, rank, n, torch.float64)
    value = sigmoid_loss(*leaves, group, ring="single_lap", backend="torch")
    (2.5 * value).backward()
    scaled = (plain[0],) + tuple(2.5 * g for g in plain[1:5]) + (plain[5],)
    check(f"weighted D={size} single_lap common weight", compare, value, [leaf.grad for leaf in leaves], scaled,
          torch.float64, "single_lap")

    # single_lap's backward talks to nobody: rank 0 alone back-propagates, the others move on, nothing waits.
    leaves = local_leaves(x, y, t, b, rank, n, torch.float64)
    value = sigmoid_loss(*leaves, group, ring="single_lap", backend="torch")
    if rank == 0:
        value.backward()
    dist.barrier(group)
    if rank == 0:
        check(f"single_lap backward alone D={size}", compare, value, [leaf.grad for leaf in leaves], plain,
              torch.float64, "single_lap alone")


def _expect_value_error(fn, match):
    try:
        fn()
    except ValueError as error:
        assert match in str(error), f"ValueError without '{match}': {error}"
        return
    raise AssertionError(f"no ValueError (expected one mentioning '{match}')")


def _disagreement_checks(rank, size, group, member, check):
    """Each mismatch raises ValueError on every rank of the group; the parent's timeout turns a hang into a failure."""
    if not member:
        return
    d = 4
    last = rank == size - 1
    n = 3 + int(last)
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    check(f"disagreement n sigmoid D={size}",
          _expect_value_error, lambda: sigmoid_loss(x, x, t, b, group), "same n on every rank")
    check(f"disagreement n softmax D={size}",
          _expect_value_error, lambda: softmax_loss(x, x, t, group), "same n on every rank")
    x3 = x[:3]
    ring_name = "single_lap" if last else "two_pass"
    check(f"disagreement implementation D={size}",
          _expect_value_error, lambda: sigmoid_loss(x3, x3, t, b, group, ring=ring_name), "same implementation")
    ids = torch.arange(3) if last else None
    check(f"disagreement positive_ids D={size}",
          _expect_value_error, lambda: sigmoid_loss(x3, x3, t, b, group, positive_ids=ids), "same positive_ids")
    leaf = x3.clone().requires_grad_(not last)
    check(f"disagreement needs_grad D={size}",
          _expect_value_error, lambda: sigmoid_loss(leaf, x3, t, b, group, ring="two_pass"), "same needs_grad")
    # One rank's own input is invalid: that rank raises its own error, its peers learn of it instead of waiting.
    bad_scale = torch.tensor(float("nan"), dtype=torch.float64) if last else t
    check(f"disagreement invalid input sigmoid D={size}",
          _expect_value_error, lambda: sigmoid_loss(x3, x3, bad_scale, b, group),
          "logit_scale must be finite" if last else "passed invalid input")
    check(f"disagreement invalid input softmax D={size}",
          _expect_value_error, lambda: softmax_loss(x3, x3 if not last else x3[:2], t, group),
          "must have the same shape" if last else "passed invalid input")


class TwoTower(torch.nn.Module):
    """Two tiny MLPs and the sigmoid loss's t' and b: the smallest model with the training step's structure."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        self.text = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        self.crit = SigmoidLoss(init_logit_scale=5.0, init_logit_bias=-2.0)

    def forward(self, images, texts, group=None, ring_name="auto", loss="sigmoid"):
        x = F.normalize(self.image(images), dim=1)
        y = F.normalize(self.text(texts), dim=1)
        if loss == "softmax":
            return softmax_loss(x, y, self.crit.logit_scale, group) + 0 * self.crit.logit_bias
        return sigmoid_loss(x, y, self.crit.logit_scale, self.crit.logit_bias, group, ring=ring_name,
                            backend="torch")


def _ddp_checks(rank, size, group, member, generator, check):
    variants = {2: [("auto", "sigmoid")], 3: [("two_pass", "sigmoid"), ("single_lap", "sigmoid")],
                WORLD: [(impl, "sigmoid") for impl in SIGMOID_RINGS] + [("-", "softmax")]}[size]
    n = 4
    images = torch.randn(size * n, 6, generator=generator, dtype=torch.float64)
    texts = torch.randn(size * n, 5, generator=generator, dtype=torch.float64)
    init_seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    if not member:
        return
    for impl, loss in variants:
        torch.manual_seed(init_seed)
        single = TwoTower().double()
        torch.manual_seed(init_seed)
        replica = TwoTower().double()
        before = [p.detach().clone() for p in single.parameters()]
        single(images, texts, loss=loss).backward()
        torch.optim.SGD(single.parameters(), lr=0.5).step()
        model = torch.nn.parallel.DistributedDataParallel(replica, process_group=group)
        rows = slice(rank * n, (rank + 1) * n)
        model(images[rows], texts[rows], group, impl, loss).backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()

        def same_parameters(single=single, replica=replica, before=before, loss=loss):
            for (name, want), got, old in zip(single.named_parameters(), replica.parameters(), before, strict=True):
                # want = old - lr * grad is rounded relative to the larger of its two terms, not to the result, which
                # can land near zero (t' = 1.6 - 1.6 gave 0.0013 and a rounding of 1.7e-13 of it, seed 182551332).
                terms = max(old.abs().max().item(), (want - old).abs().max().item())
                assert_close(got, want, tolerance(TOLERANCES[torch.float64], "x"), scale=terms, what=f"ddp {name}")
                # the step moved each tensor (CLIP has no bias), so agreeing after it says something
                assert name == "crit.logit_bias" and loss == "softmax" or (want - old).abs().max() > 1e-8, name
        check(f"ddp D={size} {loss} {impl}", same_parameters)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ring_blocks_reach_the_kernel_in_their_own_16_bit_dtype(monkeypatch, dtype, backend):
    # The Triton backend multiplies 16-bit blocks at 16-bit speed only if the ring does not widen them first; the
    # sums must still come back in float32 and match the float64 reference.
    seen, kernel = [], ring.sigmoid_block

    def spy(**arguments):
        seen.append((arguments["image_features"].dtype, arguments["text_features"].dtype))
        return kernel(**arguments)

    monkeypatch.setattr(ring, "sigmoid_block", spy)
    n, d = int(torch.randint(3, 40, ())), int(torch.randint(2, 24, ()))
    x, y = (F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1) for _ in range(2))
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    blocks = ring._Blocks(argparse.Namespace(ids=None), x.to(dtype), t, b, None, require_backend(backend))
    blocks.add(y.to(dtype), None, diagonal_offset=0)
    assert seen == [(dtype, dtype)]
    assert blocks.loss.dtype == blocks.grad_image.dtype == torch.float32
    expected = reference_sigmoid_loss(x.to(dtype).double(), y.to(dtype).double(), t, b) * n
    assert_close(blocks.loss, expected, TOLERANCES[dtype][0], what=f"ring block {dtype} loss")


# ---------------------------------------------------------------------------------------------------------------
# Memory per rank, from PyTorch's allocator events, not from anything siglip counts

MEMORY_N, MEMORY_D = 256, 1024
"""A text block of 256 x 1024 float32 is 1 MiB: each block a ring keeps per visiting rank shows as 1 MiB more.
From D = 3 on, a lap holds its steady set of blocks and accumulators (at D = 2 its one hop holds fewer), so D = 3
and D = 4 are compared: measured 9.5 MiB at both for single_lap and two_pass, 11 and 14 MiB for the all-gather
(gathered texts, their gradient, its scaled copy). The two-pass ring that kept a gradient per visiting block grew
by a block per rank."""
MEMORY_IMPLS = ("single_lap", "two_pass", "all_gather")
MIB = 2**20


def _memory_checks(rank, size, group, member, peaks):
    """Each member's peak resident-set growth over one forward and backward of each implementation at D = size."""
    if not member:
        return
    pin_mmap_threshold()
    x, y = (F.normalize(torch.randn(MEMORY_N, MEMORY_D), dim=1).requires_grad_() for _ in range(2))
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

    def step(impl):
        sigmoid_loss(x, y, t, b, group, ring=impl, backend="torch").backward()

    for impl in MEMORY_IMPLS:
        step(impl)                                   # first-call allocations (gloo buffers, thread pools) first
        for leaf in (x, y, t, b):
            leaf.grad = None                         # freed before the measurement, not inside it
        dist.barrier(group)
        peaks[impl, size] = peak_allocated_bytes(lambda impl=impl: step(impl))
        for leaf in (x, y, t, b):
            leaf.grad = None
        dist.barrier(group)


def _assert_memory_growth(impl: str, at_3: int, at_4: int) -> None:
    """From D = 3 to D = 4 the rings must stay flat (a quarter of a block allowed, for small buffers); the
    all-gather, which holds D text blocks and their gradient, must grow by at least the block it gathers more and
    its gradient: the probe sees what it should."""
    block = MEMORY_N * MEMORY_D * 4
    growth = at_4 - at_3
    figures = f"{impl}: peak {at_3 / MIB:.2f} MiB at D = 3, {at_4 / MIB:.2f} MiB at D = 4"
    if impl == "all_gather":
        assert growth >= 2 * block, f"{figures}: the probe missed a gathered block and its gradient"
    else:
        assert growth <= block / 4, f"{figures}: grew by {growth / MIB:.2f} MiB, a quarter of a block or more"
