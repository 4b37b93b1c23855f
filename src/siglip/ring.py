"""The sigmoid loss across D ranks on a ring, and its all-gather baseline (SigLIP, Zhai et al. 2023, Section 3.3).

Each rank keeps its n image rows; the n text rows of every rank visit every other rank, one block per hop, and each
visit is one call of the tiled kernel `siglip.tiled.sigmoid_block`, so no rank holds more than one tile of logits.
The kernel forms a block's gradients in the forward pass, which leaves a choice of where the gradient of a visiting
text block goes (docs/distributed.md has the cost model, a diagram and the measurements):

- "single_lap": the gradient of a visiting block travels *with* it. Each rank adds its contribution to an
  accumulator that follows the block one hop behind; after the lap the accumulator arrives home holding the block's
  whole gradient. The backward pass only scales stored gradients: no communication, nothing kept of other ranks,
  so a rank holds two text blocks and a few gradient-sized buffers whatever D is.
- "two_pass": the same lap in the forward pass, and autograd's semantics in the backward pass: each rank's
  contribution to a text gradient is scaled by that rank's own incoming gradient. The ranks first share their
  incoming gradients (one all-gather of D scalars); when they are equal (loss.backward(), one common loss scale,
  DistributedDataParallel) the folded sums are exact and only scaled. When they differ, a second lap recomputes each
  visiting block's text gradient, scaled by the visiting rank's own incoming gradient, and carries it home the same
  way. Memory stays flat in D either way; the price of differing incoming gradients is the second lap's compute.
- "bidirectional": the classic ring with half the blocks travelling each way round, so ceil((D - 1) / 2) hops
  per pass. Each rank keeps the gradient of every block it saw ((D - 1) n d floats: this one is NOT flat in D) and
  in the backward pass those gradients travel back to their owners, scaled by each rank's incoming gradient and
  summed on the way.
- "all_gather": the baseline. Every rank gathers all D * n text rows, computes its rows against all of them, and a
  reduce-scatter returns the text gradients in the backward pass.

Conventions: rank r returns S_r / n, where S_r = sum over its n images i and all D * n texts j of
softplus(-z_ij (t <x_i, y_j> + b)). The mean over ranks is then the global loss L = sum_r S_r / (D n). The
gradient reaching rank r's own image and text rows is D * dL/d(rows), and its gradient for the replicated t and b is
dS_r/dt / n, its own pairs' share, so that DistributedDataParallel's mean over ranks gives exactly dL/dt.

One difference in autograd semantics: "single_lap" folds every rank's contribution to a text gradient in the forward
pass, so it assumes each rank back-propagates the same multiple of its loss (loss.backward(), or one common loss
scale), as DistributedDataParallel training does; in exchange its backward pass needs no peer. "two_pass",
"bidirectional" and "all_gather" scale each contribution by its own rank's incoming gradient, like any autograd
function, and every rank must run their backward pass (it communicates).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from siglip.collectives import (
    TAG_BLOCK,
    TAG_GRAD,
    TAG_IDS,
    Agreement,
    CommStats,
    PointToPoint,
    all_gather_rows,
    lap_with_accumulators,
    reduce_scatter_rows,
    require_agreement,
)
from siglip.kernels.block import BlockResult, accumulation_dtype
from siglip.tiled import sigmoid_block

IMPLEMENTATIONS = ("two_pass", "bidirectional", "single_lap", "all_gather")
# `siglip bench ring` on 2 shared cores (docs/distributed.md): single_lap took 0.60-0.73 of the classic two-pass
# ring's time at D = 4 and at D = 8 with d = 768, and was within 7% elsewhere; its backward sends nothing, its memory
# is flat in D.
AUTO_IMPLEMENTATION = "single_lap"
BENCH_NAMES = {"sigmoid_all_gather": "all_gather", "softmax_all_gather": "softmax"}
"""The names `siglip bench ring` prints for the two all-gathers, and what `expected_traffic` calls them."""

def ring_sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    positive_ids: torch.Tensor | None = None,
    chunk: int | None = None,
    implementation: str = "auto",
    stats: CommStats | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """This rank's share of the global sigmoid loss over a group of D ranks, divided by its local n.

    Args:
        image_features: (n, d) this rank's L2-normalised image rows; float32/float64/bfloat16/float16.
        text_features: (n, d) this rank's text rows, same dtype; row i pairs with image row i.
        logit_scale: t, the temperature itself (0-d or 1-element), replicated on every rank.
        logit_bias: b (0-d or 1-element), replicated on every rank.
        group: the process group; every rank of it must call this with the same n, d, dtype and implementation.
        positive_ids: optional (n,) integer ids; image i and text j are positive when their ids are equal. They
            travel with the text blocks, so they compare across ranks. None: only (i, i) of the same rank is positive.
        chunk: image rows per tile inside each block; None picks one.
        implementation: "two_pass", "bidirectional", "single_lap", "all_gather" or "auto" (AUTO_IMPLEMENTATION).
        stats: optional `CommStats` that receives the bytes this rank sends and its synchronisation points.
        backend: the kernel of each block ("auto", "torch", "cpu_fused", "triton"; see `siglip.kernels`).

    Returns:
        0-d tensor in the accumulation dtype (float64 for float64 inputs, float32 otherwise): S_r / n.

    Raises:
        ValueError on every rank (never a hang) when the ranks disagree on n, d, dtype, whether ids are given,
        the implementation, or (for the rings with a backward exchange) whether gradients are needed.
    """
    name = AUTO_IMPLEMENTATION if implementation == "auto" else implementation
    needs_grad = torch.is_grad_enabled() and any(
        v.requires_grad for v in (image_features, text_features, logit_scale, logit_bias)
    )
    setup = Agreement.agree(
        "sigmoid_loss", image_features, positive_ids, group, stats,
        call=name if name in IMPLEMENTATIONS else "unknown", needs_grad=needs_grad,
    )
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"ring must be 'auto' or one of {IMPLEMENTATIONS}, got {implementation!r}")
    if name != "single_lap":
        # A backward exchange that one rank skips would leave its peers waiting forever.
        require_agreement(
            setup.shared, "needs_grad", "sigmoid_loss with ring=" + repr(name),
            "every rank must back-propagate through the loss (or none, under torch.no_grad)",
        )
    setup.needs_grad = any(row["needs_grad"] for row in setup.shared)
    return _RingSigmoid.apply(image_features, text_features, logit_scale, logit_bias, setup, name, chunk, backend)


def expected_traffic(
    implementation: str,
    world_size: int,
    n: int,
    d: int,
    dtype: torch.dtype,
    with_ids: bool = False,
    with_grad: bool = True,
    equal_weights: bool = True,
) -> CommStats:
    """The cost model of docs/distributed.md: what each rank sends and how often it waits, per forward + backward.

    `implementation` is one of IMPLEMENTATIONS, "softmax" (the gathered CLIP loss), or a name `siglip bench ring`
    prints ("sigmoid_all_gather", "softmax_all_gather"); ids are int64; `with_grad` False is a forward under
    torch.no_grad; `equal_weights` False means the ranks back-propagate different multiples of their losses, which
    sends two_pass round a second lap. The tests hold the counts the code records against this, so the documented
    model and the code cannot drift apart.
    """
    implementation = BENCH_NAMES.get(implementation, implementation)
    known = IMPLEMENTATIONS + ("softmax",) + tuple(BENCH_NAMES)
    if implementation not in IMPLEMENTATIONS + ("softmax",):
        raise ValueError(f"implementation must be one of {known}, got {implementation!r}")
    if world_size == 1:
        return CommStats()
    hops, e_in = world_size - 1, torch.empty((), dtype=dtype).element_size()
    e_acc = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    block, ids, grad = n * d * e_in, 8 * n if with_ids else 0, n * d * e_acc if with_grad else 0
    header = hops * 8 * len(Agreement.FIELDS)                     # the agreement all-gather of a few int64
    # A lap: one wait per arriving block, one per arriving accumulator (the last one: this rank's own, coming home).
    lap_bytes, lap_waits = hops * (block + ids + grad), hops * (1 + with_grad)
    if implementation == "bidirectional":
        steps = math.ceil(hops / 2)
        return CommStats(header + hops * (block + ids), hops * grad, 1 + steps, steps if with_grad else 0)
    if implementation == "single_lap":
        return CommStats(header + lap_bytes, 0, 1 + lap_waits, 0)
    if implementation == "two_pass":
        if not with_grad:
            return CommStats(header + lap_bytes, 0, 1 + lap_waits, 0)
        # backward: the all-gather of each rank's incoming gradient (one accumulation-dtype scalar), then a second
        # lap only if they differ
        again = 0 if equal_weights else 1
        return CommStats(header + lap_bytes, hops * e_acc + again * lap_bytes, 1 + lap_waits, 1 + again * lap_waits)
    if implementation == "all_gather":
        return CommStats(header + hops * (block + ids), hops * grad, 2 + with_ids, int(with_grad))
    return CommStats(header + hops * (2 * block + ids), 2 * hops * grad, 3 + with_ids, 2 * with_grad)


class _Blocks:
    """This rank's images against one text block at a time, summing the kernel's results over blocks."""

    def __init__(self, setup: Agreement, images: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 chunk: int | None, backend: str):
        self.setup, self.images, self.chunk, self.backend = setup, images, chunk, backend
        # t and b stay 0-d tensors on the features' device: the kernels read them there (no host-device sync).
        self.scale, self.bias = scale.detach().reshape(()), bias.detach().reshape(())
        # The blocks keep the features' own dtype, so a 16-bit ring hands 16-bit blocks to the kernel (the Triton
        # backend multiplies them at 16-bit speed); the kernel's sums, and so these, are in the accumulation dtype.
        acc = accumulation_dtype(images.dtype)
        self.loss = torch.zeros((), dtype=acc, device=images.device)
        self.grad_image = torch.zeros(images.shape, dtype=acc, device=images.device)
        self.grad_scale = torch.zeros((), dtype=acc, device=images.device)
        self.grad_bias = torch.zeros((), dtype=acc, device=images.device)

    def run(self, texts: torch.Tensor, text_ids: torch.Tensor | None, diagonal_offset: int | None) -> BlockResult:
        """The kernel on (n images) x (m texts), nothing added. Without ids the positives are (i, i + offset): 0 for
        the rank's own block, None (no positives) for a visiting one; with ids the offset is ignored."""
        image_ids = self.setup.ids
        return sigmoid_block(
            image_features=self.images,
            text_features=texts,
            logit_scale=self.scale,
            logit_bias=self.bias,
            diagonal_offset=None if image_ids is not None else diagonal_offset,
            image_ids=image_ids,
            text_ids=text_ids,
            chunk=self.chunk,
            backend=self.backend,
        )

    def add(self, texts: torch.Tensor, text_ids: torch.Tensor | None, diagonal_offset: int | None) -> BlockResult:
        """Run the kernel (see `run`); add loss, image, t and b gradients; return the block's result."""
        result = self.run(texts, text_ids, diagonal_offset)
        self.loss += result.loss
        self.grad_image += result.grad_image
        self.grad_scale += result.grad_scale
        self.grad_bias += result.grad_bias
        return result


def _lanes(world: int) -> list[tuple[int, int]]:
    """(direction, hops) of the bidirectional ring's two streams of blocks: +1 travels to rank r + 1, -1 to r - 1."""
    hops = world - 1
    lanes = [(+1, math.ceil(hops / 2)), (-1, hops // 2)]
    return [(direction, count) for direction, count in lanes if count > 0]


def _tag(lane: int, stream: int) -> int:
    return 3 * lane + stream


def _forward_lanes(setup: Agreement, blocks: _Blocks, texts, keep) -> tuple[torch.Tensor, list]:
    """Bidirectional forward: blocks travel along each lane; returns the own block's text gradient and, per lane,
    the text gradients of the visiting blocks in the order they arrived (kept only when `keep`: (D - 1) n d)."""
    p2p = PointToPoint(setup.group, setup.stats, "forward")
    lanes = _lanes(setup.world)
    ids = setup.ids
    current = [(texts, ids)] * len(lanes)
    incoming = [None] * len(lanes)
    works: list = []

    def post_next(step: int) -> None:
        # Forward what this rank holds on each lane and receive the next block, before computing the current one.
        sends, recvs = [], []
        for lane, (direction, hops) in enumerate(lanes):
            if step > hops:
                continue
            block, block_ids = current[lane]
            buffer = (torch.empty_like(texts), None if ids is None else torch.empty_like(ids))
            incoming[lane] = buffer
            sends.append((block, setup.peer(direction), _tag(lane, TAG_BLOCK)))
            recvs.append((buffer[0], setup.peer(-direction), _tag(lane, TAG_BLOCK)))
            if ids is not None:
                sends.append((block_ids, setup.peer(direction), _tag(lane, TAG_IDS)))
                recvs.append((buffer[1], setup.peer(-direction), _tag(lane, TAG_IDS)))
        works[:] = p2p.post(sends, recvs)

    post_next(1)
    own_grad_text = blocks.add(texts, ids, diagonal_offset=0).grad_text
    contributions: list[list[torch.Tensor]] = [[] for _ in lanes]
    for step in range(1, max((hops for _, hops in lanes), default=0) + 1):
        p2p.wait(works)
        active = [lane for lane, (_, hops) in enumerate(lanes) if step <= hops]
        for lane in active:
            current[lane] = incoming[lane]
        post_next(step + 1)
        for lane in active:
            result = blocks.add(*current[lane], diagonal_offset=None)
            if keep:
                contributions[lane].append(result.grad_text)
    p2p.wait()
    return own_grad_text, contributions


def _backward_lanes(setup: Agreement, contributions: list, scale: torch.Tensor) -> torch.Tensor:
    """Bidirectional backward: send each visited block's gradient home against the direction it came, scaled by this
    rank's incoming gradient and summed on the way.

    On a lane of h hops the block received at step s belongs to rank r - direction * s. Its accumulator starts at the
    last rank it visited and moves one hop back per step; at step j this rank adds its contribution for the block
    it saw at step h - j + 1 to the accumulator coming from r + direction and passes it to r - direction. After h
    steps the accumulator of this rank's own block has arrived. Returns the sum of those home accumulators.
    """
    p2p = PointToPoint(setup.group, setup.stats, "backward")
    lanes = _lanes(setup.world)
    received: list = [None] * len(lanes)
    works: list = []
    for step in range(1, max((hops for _, hops in lanes), default=0) + 1):
        if step > 1:
            p2p.wait(works)
        sends, recvs = [], []
        for lane, (direction, hops) in enumerate(lanes):
            if step > hops:
                continue
            mine = contributions[lane][hops - step] * scale     # the block seen at forward step hops - step + 1
            contributions[lane][hops - step] = None             # free it as soon as it has left
            accumulator = mine if step == 1 else received[lane].add_(mine)   # the received buffer is ours
            received[lane] = torch.empty_like(accumulator)
            sends.append((accumulator, setup.peer(-direction), _tag(lane, TAG_GRAD)))
            recvs.append((received[lane], setup.peer(direction), _tag(lane, TAG_GRAD)))
        works = p2p.post(sends, recvs)
    p2p.wait(works)
    return sum(received[1:], received[0])


def _forward_all_gather(setup: Agreement, blocks: _Blocks, texts: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """All-gather forward: every text row of the group in one block; returns its (D n, d) gradient if `keep`."""
    all_texts = all_gather_rows(texts, setup.group, setup.stats, "forward")
    all_ids = None if setup.ids is None else all_gather_rows(setup.ids, setup.group, setup.stats, "forward")
    # The rank's own texts sit at rows [r n, (r + 1) n) of the gathered block.
    result = blocks.add(all_texts, all_ids, diagonal_offset=setup.rank * setup.n)
    return result.grad_text if keep else None


class _RingSigmoid(torch.autograd.Function):
    """Forward: the chosen exchange with the kernel on each block. Backward: scale; two_pass checks that every rank
    scales alike (else it recomputes); bidirectional sends the kept gradients home; all_gather reduce-scatters."""

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, logit_bias, setup, implementation, chunk,  # noqa: D401
                backend="auto"):
        blocks = _Blocks(setup, image_features.contiguous(), logit_scale, logit_bias, chunk, backend)
        texts = text_features.contiguous()
        keep = setup.needs_grad
        saved_text, contributions, home = None, None, None
        if setup.world == 1:
            # A group of one: the rank's own block is the whole batch, and nothing travels.
            implementation = "single_lap"
            saved_text = blocks.add(texts, setup.ids, diagonal_offset=0).grad_text
        elif implementation in ("single_lap", "two_pass"):
            own: list[torch.Tensor] = []

            def visiting(block, ids):
                return blocks.add(block, ids, diagonal_offset=None).grad_text

            def own_block():                      # computed while the first block travels
                own.append(blocks.add(texts, setup.ids, diagonal_offset=0).grad_text)

            home = lap_with_accumulators(setup, texts, visiting, "forward", keep, while_first_travels=own_block)
            saved_text = own[0]
            if implementation == "single_lap" and home is not None:
                saved_text, home = saved_text.add_(home), None
        elif implementation == "all_gather":
            saved_text = _forward_all_gather(setup, blocks, texts, keep)
        else:
            saved_text, contributions = _forward_lanes(setup, blocks, texts, keep)
        ctx.setup, ctx.implementation, ctx.contributions = setup, implementation, contributions
        # two_pass may have to recompute the visiting blocks' text gradients in backward: it keeps the inputs.
        ctx.recompute = (blocks, texts) if implementation == "two_pass" else None
        ctx.shapes = (logit_scale.shape, logit_bias.shape)
        ctx.dtypes = (image_features.dtype, text_features.dtype, logit_scale.dtype, logit_bias.dtype)
        if keep:
            extra = (home,) if home is not None else ()
            ctx.save_for_backward(blocks.grad_image, saved_text, blocks.grad_scale, blocks.grad_bias, *extra)
        return blocks.loss / setup.n

    @staticmethod
    def backward(ctx, grad_output):
        setup = ctx.setup
        grad_image, saved_text, grad_scale, grad_bias, *home = ctx.saved_tensors
        # Every stored sum is a gradient of S_r; the returned value is S_r / n.
        scale = grad_output.to(grad_image.dtype) / setup.n
        if ctx.implementation == "single_lap":
            grad_text = saved_text * scale
        elif ctx.implementation == "two_pass":
            grad_text = _two_pass_text_gradient(ctx, saved_text, home[0] if home else None, grad_output, scale)
        elif ctx.implementation == "all_gather":
            grad_text = reduce_scatter_rows(saved_text * scale, setup.group, setup.stats, "backward")
        else:
            if ctx.contributions is None:
                raise RuntimeError(
                    f"the {ctx.implementation} ring frees the visiting blocks' gradients as they travel home, so its "
                    "backward runs once; use ring='single_lap' or 'two_pass' to back-propagate through one loss "
                    "several times"
                )
            contributions, ctx.contributions = ctx.contributions, None
            grad_text = saved_text * scale + _backward_lanes(setup, contributions, scale)
        image_dtype, text_dtype, scale_dtype, bias_dtype = ctx.dtypes
        scale_shape, bias_shape = ctx.shapes
        return (
            (grad_image * scale).to(image_dtype),
            grad_text.to(text_dtype),
            (grad_scale * scale).to(scale_dtype).reshape(scale_shape),
            (grad_bias * scale).to(bias_dtype).reshape(bias_shape),
            None,
            None,
            None,
            None,
        )


def _two_pass_text_gradient(ctx, own: torch.Tensor, home: torch.Tensor | None, grad_output: torch.Tensor,
                            scale: torch.Tensor) -> torch.Tensor:
    """sum over ranks k of (k's incoming gradient / n) * (k's part of this rank's text gradient).

    The forward lap folded the other ranks' parts into `home` unscaled: right as it is when every rank's incoming
    gradient equals this one's, which one all-gather of D scalars shows. Otherwise a second lap recomputes each
    visiting block's text gradient, scales it by this rank's own incoming gradient and carries it home.
    """
    setup = ctx.setup
    incoming = all_gather_rows(grad_output.detach().reshape(1, 1).to(own.dtype), setup.group, setup.stats,
                               "backward")                                           # (D, 1), identical on all ranks
    # Every rank compares the same gathered values, so all take the same branch (NaN differs from itself: recompute).
    if home is not None and bool((incoming == incoming[0]).all()):
        return (own + home) * scale
    blocks, texts = ctx.recompute
    def scaled_part(block, ids):
        return blocks.run(block, ids, diagonal_offset=None).grad_text.mul_(scale)

    return own * scale + lap_with_accumulators(setup, texts, scaled_part, "backward", keep=True)
