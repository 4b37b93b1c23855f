"""The exchanges behind the distributed losses: point-to-point hops, agreement checks, all-gathers with gradients.

Everything here is small on purpose. `siglip.ring` composes these pieces (point-to-point hops, the lap of blocks with
their gradient accumulators one hop behind, all-gathers) into the rings of the sigmoid loss and the all-gather
baseline, `siglip.softmax` into CLIP's gathered loss; before either exchanges a byte, the ranks agree on
what they are about to do (`Agreement`), so that a mismatch is one ValueError on every rank instead of a hang. Each
piece counts what it sends in a `CommStats`, so the benchmark reports bytes and synchronisation points as the code
itself moved them, not as a formula predicts.

Counting conventions (per rank, per call):
- a point-to-point send counts its payload exactly; a receive counts nothing (the sender counted it);
- a collective counts what a ring algorithm sends per rank: an all-gather or reduce-scatter of `m` bytes per rank
  sends (D - 1) * m. Gloo and NCCL may pick other algorithms; this is the bandwidth-optimal figure they approach;
- a synchronisation point is a moment this rank blocks until a peer has caught up: one `wait` on a set of
  in-flight point-to-point operations, or one blocking collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from siglip.kernels.block import accumulation_dtype

PHASES = ("forward", "backward")
LOSS_CALLS = ("two_pass", "bidirectional", "single_lap", "all_gather", "softmax_loss")
"""What a rank can be calling when the group agrees: each ring of the sigmoid loss, and the gathered softmax loss."""
DTYPE_CODES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Message tags: gloo pairs sends and receives by (peer, tag); each stream of blocks gets its own tags.
TAG_BLOCK, TAG_IDS, TAG_GRAD = 0, 1, 2


@dataclass
class CommStats:
    """What one rank sent and how often it waited, during one forward and its backward.

    Pass a fresh instance to `siglip.ring.ring_sigmoid_loss(..., stats=...)` (or
    `siglip.softmax.gathered_softmax_loss`); the forward pass fills the forward fields, the backward pass the backward
    fields.
    """

    forward_bytes: int = 0
    """Bytes this rank sent during the forward pass."""
    backward_bytes: int = 0
    """Bytes this rank sent during the backward pass."""
    forward_sync_points: int = 0
    """Times this rank blocked on communication during the forward pass."""
    backward_sync_points: int = 0
    """Times this rank blocked on communication during the backward pass."""

    def record(self, phase: str, sent_bytes: int = 0, sync_points: int = 0) -> None:
        """Add `sent_bytes` and `sync_points` to the fields of `phase` ("forward" or "backward")."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        setattr(self, f"{phase}_bytes", getattr(self, f"{phase}_bytes") + int(sent_bytes))
        setattr(self, f"{phase}_sync_points", getattr(self, f"{phase}_sync_points") + int(sync_points))


def payload_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements: what a send of it puts on the wire."""
    return tensor.numel() * tensor.element_size()


class PointToPoint:
    """Posts batches of sends and receives on a group and waits for them, counting bytes and waits.

    Peers are ranks within `group`. Sends stay in flight (their tensors referenced here, so nothing frees or
    reuses them early) until the next `wait`, which completes them together with the receives it was asked for.
    """

    def __init__(self, group: dist.ProcessGroup, stats: CommStats | None, phase: str):
        self.group = group
        self.stats = stats
        self.phase = phase
        self._pending_sends: list[tuple[list[dist.Work], list[torch.Tensor]]] = []

    def post(
        self,
        sends: list[tuple[torch.Tensor, int, int]] = (),
        recvs: list[tuple[torch.Tensor, int, int]] = (),
    ) -> list[dist.Work]:
        """Start `sends` and `recvs`, each a list of (tensor, peer rank in the group, tag); return the receives' works.

        The order of operations towards one peer must match the order the peer posts them: NCCL ignores tags and
        pairs messages by order alone (gloo pairs by tag, so distinct tags also guard against slips).
        """
        ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(self.group, p), self.group, tag) for t, p, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(self.group, p), self.group, tag) for t, p, tag in recvs]
        if not ops:
            return []
        works = dist.batch_isend_irecv(ops)
        # The sent tensors stay referenced until their sends complete; nothing may free or overwrite them before.
        self._pending_sends.append((works[: len(sends)] if len(works) == len(ops) else works, [t for t, _, _ in sends]))
        if self.stats is not None:
            self.stats.record(self.phase, sent_bytes=sum(payload_bytes(t) for t, _, _ in sends))
        # Some backends (NCCL) return one work for the whole coalesced batch: waiting on it covers every operation.
        return works[len(sends):] if len(works) == len(ops) else list(works)

    def wait(self, works: list[dist.Work] = ()) -> None:
        """Block until `works` and every send posted so far have completed: one synchronisation point."""
        pending, self._pending_sends = self._pending_sends, []
        if not works and not pending:
            return
        for work in works:
            work.wait()
        for send_works, _ in pending:
            for work in send_works:
                work.wait()
        if self.stats is not None:
            self.stats.record(self.phase, sync_points=1)


def all_gather_rows(
    tensor: torch.Tensor, group: dist.ProcessGroup, stats: CommStats | None = None, phase: str = "forward"
) -> torch.Tensor:
    """(n, ...) on each of D ranks -> (D * n, ...) on every rank, rank r's rows at [r * n, (r + 1) * n)."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    out = torch.empty((world * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    # all_gather_single is the newer name (torch >= 2.9) of all_gather_into_tensor, which it deprecates.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor, group=group)
    if stats is not None:
        stats.record(phase, sent_bytes=(world - 1) * payload_bytes(tensor), sync_points=1)
    return out


def reduce_scatter_rows(
    tensor: torch.Tensor, group: dist.ProcessGroup, stats: CommStats | None = None, phase: str = "backward"
) -> torch.Tensor:
    """(D * n, ...) on each of D ranks -> (n, ...) on rank r: rows [r * n, (r + 1) * n) summed over ranks."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    n = tensor.shape[0] // world
    out = torch.empty((n,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, tensor, group=group)
    if stats is not None:
        stats.record(phase, sent_bytes=(world - 1) * payload_bytes(out), sync_points=1)
    return out


class AllGatherWithGrad(torch.autograd.Function):
    """All-gather of rows whose backward sums each rank's slice of the gradient back to its owner (reduce-scatter).

    Forward: (n, d) -> (D * n, d). Backward: the (D * n, d) gradient of every rank is summed and rank r keeps rows
    [r * n, (r + 1) * n), so each rank's own features receive what every rank's loss asked of them. The sum runs in
    float32 (float64 stays float64): 16-bit sums over D ranks would round away what the ranks computed.
    Every rank must run the backward (it is a collective).
    """

    @staticmethod
    def forward(ctx, tensor, group, stats):  # noqa: D401
        ctx.group, ctx.stats = group, stats
        return all_gather_rows(tensor, group, stats, "forward")

    @staticmethod
    def backward(ctx, grad_output):
        accumulate = torch.float64 if grad_output.dtype == torch.float64 else torch.float32
        summed = reduce_scatter_rows(grad_output.to(accumulate), ctx.group, ctx.stats, "backward")
        return summed.to(grad_output.dtype), None, None


def agree_across_ranks(
    group: dist.ProcessGroup,
    fields: dict[str, int],
    device: torch.device,
    stats: CommStats | None = None,
) -> list[dict[str, int]]:
    """Share small integers (shapes, codes, flags) with every rank: one tiny all-gather, one synchronisation point.

    Returns a list with each rank's `fields`. Callers compare them and raise on every rank alike: all ranks see the
    same list, so a mismatch becomes the same ValueError everywhere instead of a hang in the next exchange.
    """
    names = list(fields)
    mine = torch.tensor([int(fields[name]) for name in names], dtype=torch.int64, device=device)
    gathered = all_gather_rows(mine[None, :], group, stats, "forward").cpu().tolist()
    return [dict(zip(names, row, strict=True)) for row in gathered]


def require_agreement(shared: list[dict[str, int]], field: str, what: str, advice: str) -> None:
    """Raise ValueError (on every rank, since all see `shared`) unless all ranks gave the same `field`."""
    values = [row[field] for row in shared]
    if any(value != values[0] for value in values):
        raise ValueError(
            f"{what} needs the same {field} on every rank of the group, got {values} on ranks 0..{len(values) - 1}; "
            f"{advice}"
        )


@dataclass
class Agreement:
    """What every rank agreed on before the first exchange, and the rank's place in the group (and on the ring)."""

    group: dist.ProcessGroup
    rank: int
    world: int
    n: int
    stats: CommStats | None
    ids: torch.Tensor | None
    shared: list[dict[str, int]] = field(default_factory=list)
    needs_grad: bool = True

    FIELDS = ("valid", "n", "d", "dtype", "positive_ids", "implementation", "needs_grad")

    @classmethod
    def agree(cls, what, image_features, positive_ids, group, stats, *, call, needs_grad) -> Agreement:
        """One tiny all-gather of n, d, dtype, ids-or-not, the call (one of LOSS_CALLS) and needs-grad; ValueError on
        any mismatch."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n, d = image_features.shape
        setup = cls(group, rank, world, n, stats, None if positive_ids is None else positive_ids.contiguous())
        if world == 1:
            setup.shared = [{"needs_grad": int(needs_grad)}]
            return setup
        fields = dict(
            valid=1, n=n, d=d, dtype=DTYPE_CODES.index(image_features.dtype),
            # 0 without ids, else their element size: ids of another integer width would not fit the receive buffers
            positive_ids=0 if positive_ids is None else positive_ids.element_size(),
            implementation=LOSS_CALLS.index(call) if call in LOSS_CALLS else -1, needs_grad=needs_grad,
        )
        setup.shared = agree_across_ranks(group, fields, image_features.device, stats)
        _raise_if_a_rank_failed_validation(setup.shared, what)
        require_agreement(setup.shared, "n", what, "split the global batch evenly across ranks (drop the remainder)")
        require_agreement(setup.shared, "d", what, "every rank must use the same model")
        require_agreement(setup.shared, "dtype", what, "cast the features to one dtype on every rank")
        require_agreement(
            setup.shared, "positive_ids", what, "pass positive_ids of one integer dtype on every rank, or on none"
        )
        names = dict(enumerate(LOSS_CALLS)) | {-1: "unknown"}
        require_agreement(setup.shared, "implementation", what, f"call the same loss and ring on every rank {names}")
        return setup

    @classmethod
    def join_invalid(cls, what: str, group: dist.ProcessGroup, device: torch.device, error: ValueError) -> None:
        """Take part in the agreement for a rank whose input failed validation, then raise on every rank.

        Without this, the other ranks would wait in the agreement's all-gather for this one until the timeout.
        """
        fields = dict.fromkeys(cls.FIELDS, 0)
        shared = agree_across_ranks(group, fields, device)
        _raise_if_a_rank_failed_validation(shared, what, own_error=error)

    def peer(self, offset: int) -> int:
        """The rank `offset` steps along the ring (negative: against it)."""
        return (self.rank + offset) % self.world


def _raise_if_a_rank_failed_validation(
    shared: list[dict[str, int]], what: str, own_error: ValueError | None = None
) -> None:
    failed = [rank for rank, row in enumerate(shared) if not row["valid"]]
    if own_error is not None:
        raise own_error
    if failed:
        raise ValueError(f"{what}: rank(s) {failed} passed invalid input (their error names it); every rank stops")


def join_agreement_after_invalid_input(
    what: str, group: dist.ProcessGroup, device: torch.device, error: ValueError
) -> None:
    """For `siglip.loss`: a rank whose local validation failed joins its peers' agreement and raises `error`."""
    Agreement.join_invalid(what, group, device, error)


def lap_with_accumulators(setup: Agreement, texts: torch.Tensor, contribution, phase: str, keep: bool,
                          while_first_travels=None) -> torch.Tensor | None:
    """One lap of the text blocks r -> r + 1, each block's gradient accumulator following one hop behind it.

    At step s (1 .. D - 1) this rank holds the block of rank r - s, and `contribution(block, block_ids)` returns its
    own part of that block's gradient ((n, d), accumulation dtype). The accumulator of that block, holding the parts
    of ranks r - s + 1 .. r - 1, arrives from r - 1 while the part is computed; this rank adds its part and passes
    the accumulator on. The one sent at step D - 1 reaches its owner r + 1 complete. `while_first_travels`, if
    given, runs while the first block is on its way (the forward pass computes the rank's own block then).

    Returns the accumulator of this rank's own block (every other rank's part summed), or None unless `keep`.
    """
    p2p = PointToPoint(setup.group, setup.stats, phase)
    hops, ids = setup.world - 1, setup.ids
    nxt, prv = setup.peer(+1), setup.peer(-1)
    acc_dtype = accumulation_dtype(texts.dtype)

    def block_ops(block, block_ids):
        buffer = (torch.empty_like(texts), None if ids is None else torch.empty_like(ids))
        sends = [(block, nxt, TAG_BLOCK)]
        recvs = [(buffer[0], prv, TAG_BLOCK)]
        if ids is not None:
            sends.append((block_ids, nxt, TAG_IDS))
            recvs.append((buffer[1], prv, TAG_IDS))
        return sends, recvs, buffer

    sends, recvs, incoming = block_ops(texts, ids)
    block_works = p2p.post(sends, recvs)
    if while_first_travels is not None:
        while_first_travels()
    grad_works, grad_in = [], None
    for step in range(1, hops + 1):
        p2p.wait(block_works)
        current = incoming
        # Post, before computing: forward this block if it has further to go and receive the next one; then receive
        # the accumulator of the block arriving next (at the last step: of this rank's own block, coming home).
        # Towards one peer the order is always block, ids, accumulator, on both sides, as NCCL's pairing needs.
        block_works = []
        if step < hops:
            sends, recvs, incoming = block_ops(*current)
            block_works = p2p.post(sends, recvs)
        if keep:
            arriving = torch.empty(texts.shape, dtype=acc_dtype, device=texts.device)
            next_grad_works = p2p.post(recvs=[(arriving, prv, TAG_GRAD)])
        part = contribution(*current)
        if keep:
            if step > 1:
                p2p.wait(grad_works)                       # the accumulator of `current`, from rank r - 1
                accumulator = grad_in.add_(part)           # in place: the buffer is ours until it is sent
            else:
                accumulator = part                         # this rank is the block's first visitor
            p2p.post(sends=[(accumulator, nxt, TAG_GRAD)])
            grad_works, grad_in = next_grad_works, arriving
        del part
    p2p.wait(grad_works)
    return grad_in if keep else None
