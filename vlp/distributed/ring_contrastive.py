"""Ring-based, tiled contrastive losses: O(b·D + t²) memory per rank, never (b, B).

Shapes: b local batch, W world size, B = W·b global batch, D feature dim, K hard negatives per
image, t tile size. x: this rank's image features (b, D), y: its text features (b, D),
n: its hard-negative captions (b·K, D); S = X·Yᵀ the (never materialised) B×B similarity matrix;
s: logit scale (already exponentiated), bias: logit bias.

Each rank owns the rows of S for its images and visits every rank's column block (y, and n for
the image->text direction) as the blocks travel the ring (send to r+1, receive from r-1; the next
transfer is posted before the current block is computed). Tiles (t, t) of a block are reduced on
the fly; per-column results (column log-sum-exp in the forward, dy / dn in the backward) travel
with their block and arrive back at its owner after W steps. Inf-CL ("Breaking the Memory
Barrier", docs/design.md §4) computes the same quantities; here one pass over S serves both softmax
directions (row LSE = image->text, column LSE = text->image), so the softmax costs one tile
matmul in the forward and three in the backward (open_clip's gather: two and four).

Schedule: every ring step posts one `batch_isend_irecv` for the blocks (before computing) and
one for the travelling column results (after computing; received while the next block is
computed). Every rank posts the same sequence of send+receive pairs, which NCCL needs.
Memory per rank: the current and the incoming column block, the row accumulators, and up to
three column-result blocks (being computed, being sent, being received), i.e. O((1 + K)·b·D),
plus a few (t, t) tile temporaries. Only x, y, n and the two LSE vectors (b) are saved for the
backward (softmax); the sigmoid keeps its finished (b, D) gradients instead.

Leave-one-out softmax (DCL / InfoLOOB, `leave_one_out=True`): each positive is left out of its
row's and its column's log-sum-exp. Positives lie on the diagonal of the diagonal tiles of the
own (home) block, which the forward (after reading the positives off) and the recomputing
backward both set to −inf, so they add nothing to an LSE nor to a probability-weighted sum; the
positives' own gradient (−1/(2B) per direction) is unchanged.

Multi-positive softmax (multipos, `ring_multipos_loss`): K captions per image, padding masked.
Its positives' logits are local, so only the denominators need the ring: `_RingLSE` returns
the row and column LSEs of image rows against the ring-passed caption blocks (b·K, D), with
a −inf column bias for padding, and its backward is exact for any incoming row and column
gradients (those of the columns travel with their block). The loss itself is plain autograd
on those LSEs and the local positives.

Weighted softmax (CWCL, `ring_weighted_clip_loss`): soft targets w_ij = weight(q_i·q_j) from
detached weight features q. Each direction's row loss is its LSE minus Σ_j w_ij·S_ij / Σ_j w_ij,
which is linear in the logits, so `_RingSoftTargets` extends `_RingLSE`: the text blocks travel
with their q, each tile's w is formed from the rows' and the block's q, and the same pass sums
w ⊙ S over rows (image→text targets) and over columns (text→image, returned with the block)
and w over rows (the normalisers; w is symmetric, so row i's is also column i's). Its
backward adds w_ij·(g_row_i + g_col_j) to each recomputed tile's dL/dS_ij.

Precision: tiles are computed and reduced in float32 (float64 for float64 features): the
operands are upcast once per block, so with bf16/fp16 features the loss is the float32 loss of
the rounded features, not one of similarities rounded to half precision (bf16 rounds x·y by up
to 2⁻⁹, so logits at scale 100 by up to 0.2). The positive logits s·x_i·y_i are read from the
very tiles the LSEs come from, so LSE ≥ positive holds exactly and the softmax loss is never
negative from rounding. Features travel the ring in their own dtype.

Gradient semantics (both losses). L is the loss on the global batch. Every rank returns the
value of L. Backward on rank r yields W·dL/dx_r, W·dL/dy_r, W·dL/dn_r for its own features
(each column block's gradient is summed over all ranks' rows as it travels), and W × the share of
dL/ds (and dL/dbias) that comes from its own rows. The logit-scale gradient is deliberately not
all-reduced: DDP averages parameter gradients over the W ranks, so the mean of the per-rank
shares times W is exactly dL/ds (Inf-CL all-reduces it, which DDP then leaves W× too large),
and the mean of W·J_rᵀ dL/d(features_r) is exactly dL/dθ for every encoder parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributed import ProcessGroup

from vlp.distributed.collectives import Ring, global_value
from vlp.distributed.shapes import (
    check_leave_one_out,
    check_local,
    check_positives,
    check_same_on_every_rank,
    check_weight_features,
    flat_negatives,
)

DEFAULT_TILE_SIZE = 1024
"""Rows and columns per logits tile: a tile's temporaries are a few t² floats."""

_DATA_TAG = 0  # tags keep the two kinds of ring traffic apart on gloo (NCCL matches by order)
_ACC_TAG = 16

Visit = Callable[[list[Tensor]], list[Tensor]]
TileHook = Callable[[slice, slice, Tensor, Tensor], None]
"""hook(rows, columns, tile, scratch): called on every (rows, columns) tile of a block, with a
free scratch buffer of the tile's shape."""


Merge = Callable[[Tensor, Tensor], Tensor]


def ring_pass(
    ring: Ring, block: list[Tensor], visit: Visit, merge: Merge | Sequence[Merge]
) -> list[Tensor]:
    """Show every rank's `block` to `visit` once; return the column results of this rank's block.

    `visit(block)` accumulates this rank's row results itself and returns results for the
    visited block's columns (fresh tensors). Those travel on with the block, combined by
    `merge(part, earlier)` (which may update `part` in place; one for every result, or a list
    of one per result) with what the ranks before computed for it, and after W steps the owner
    holds the results of all ranks for its own columns.
    """
    columns_in_flight = None
    for step in range(ring.size):
        data = ring.shift(block, tag=_DATA_TAG) if step < ring.size - 1 else None
        columns = visit(block)
        if columns_in_flight is not None:
            earlier = columns_in_flight.wait()
            merges = merge if isinstance(merge, Sequence) else [merge] * len(columns)
            columns = [m(c, e) for m, c, e in zip(merges, columns, earlier, strict=True)]
        columns_in_flight = ring.shift(columns, tag=_ACC_TAG) if ring.size > 1 and columns else None
        if data is not None:
            block = data.wait()
    return columns if columns_in_flight is None else columns_in_flight.wait()


def _tiles(length: int, tile_size: int) -> list[slice]:
    return [slice(i, min(i + tile_size, length)) for i in range(0, length, tile_size)]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Tiles, softmax statistics and gradients are computed in at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))  # Σ a ⊙ b without a temporary


def _part(values: Tensor | None, tile: slice) -> Tensor | None:
    return None if values is None else values[tile]


def _zeros(like: Tensor, dtype: torch.dtype, shape: Sequence[int] = ()) -> Tensor:
    return torch.zeros(shape, dtype=dtype, device=like.device)


class _TileBuffers:
    """Three reusable scratch tiles (at most t × t), so a block's tiles allocate nothing.

    Fresh tile-sized tensors cost page faults on CPU (glibc maps blocks this large anew each
    time) and allocator traffic on GPU; views of one flat buffer stay contiguous whatever the
    tile's shape.
    """

    def __init__(self, rows: Tensor, columns: Tensor, tile_size: int, dtype: torch.dtype) -> None:
        numel = min(tile_size, rows.shape[0]) * min(tile_size, columns.shape[0])
        self._flat = [torch.empty(numel, dtype=dtype, device=rows.device) for _ in range(3)]

    def logits(self, rows: Tensor, columns: Tensor, bias: Tensor | None = None) -> Tensor:
        """rows·columnsᵀ (+ bias) into the first buffer; operands already in float32+."""
        out = self._flat[0][: rows.shape[0] * columns.shape[0]].view(
            rows.shape[0], columns.shape[0]
        )
        torch.mm(rows, columns.T, out=out)
        return out if bias is None else out.add_(bias)

    def scratch(self, like: Tensor, index: int = 1) -> Tensor:
        return self._flat[index][: like.numel()].view(like.shape)


def _lse(logits: Tensor, dim: int, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """logsumexp of logits along `dim`, and the peaks it shifted by (keepdim).

    The shifted exponentials are left in `scratch`. Logits may be −inf (a left-out positive);
    the peak is kept finite so that a line of only −inf has LSE −inf, not NaN.
    """
    peak = logits.amax(dim, keepdim=True).clamp_min_(torch.finfo(logits.dtype).min)
    torch.sub(logits, peak, out=scratch).exp_()
    return scratch.sum(dim).log_().add_(peak.squeeze(dim)), peak


COLUMNS_FROM_ROWS_RANGE = 40.0
"""Largest spread of a tile's column maxima for which `_column_lse` reuses the row exponentials."""


def _column_lse(logits: Tensor, row_exps: Tensor, row_peak: Tensor) -> Tensor:
    """logsumexp of each column of a tile whose row-shifted exponentials are in `row_exps`.

    Σ_i exp(l_ij) = e^M · Σ_i exp(l_ij − m_i)·exp(m_i − M) (m_i row maxima, M the tile's): one
    matrix-vector product instead of a second subtract-and-exp pass over the tile. Terms below
    e^-87 of e^M underflow in float32, which is harmless while every column's largest term is
    within e^-40 of e^M (the lost terms are then < e^-47 of the column's sum); otherwise, and
    on accelerators (the check reads a value on the host), the column LSE is computed directly.
    A column of only −inf (a left-out one: multipos padding) sums to exactly 0 either way, so
    it does not count in the spread.
    """
    if logits.device.type == "cpu":
        top, column_peak = row_peak.max(), logits.amax(0)
        lowest = torch.where(column_peak.isneginf(), top, column_peak).min()
        if top - lowest < COLUMNS_FROM_ROWS_RANGE:
            weights = torch.sub(row_peak.squeeze(1), top).exp_()
            return torch.mv(row_exps.T, weights).log_().add_(top)
    return _lse(logits, 0, row_exps)[0]


def _softplus_sum(logits: Tensor, scratch: Tensor, scratch2: Tensor) -> Tensor:
    """Σ softplus(logits) = Σ max(l, 0) + log1p(exp(−|l|)), with a vectorised log1p.

    torch's log1p (and so softplus) is not vectorised on CPU and costs ~6× a log; log1p(u) is
    log(w) − ((w − 1) − u)/w for w = 1 + u rounded, where (w − 1) − u is exact: the rounding
    error of w, corrected to first order (the next term is below 1e-14).
    """
    u = torch.abs(logits, out=scratch).neg_().exp_()
    w_minus_1 = torch.add(u, 1, out=scratch2).sub_(1)
    rounding = torch.sub(w_minus_1, u, out=scratch)
    w = w_minus_1.add_(1)
    correction = rounding.div_(w)
    log1p = w.log_().sub_(correction)
    return log1p.add_(torch.clamp_min(logits, 0, out=scratch)).sum()


def _block_lse(
    xs: Tensor,
    columns: Tensor,
    tile_size: int,
    *,
    row_lse: Tensor,
    with_columns: bool,
    positive: Tensor | None = None,
    leave_one_out: bool = False,
    column_bias: Tensor | None = None,
    tile_hook: TileHook | None = None,
) -> Tensor | None:
    """Merge each row's log-sum-exp of xs·columnsᵀ into `row_lse`; return the columns' LSE.

    xs: this rank's rows already multiplied by the scale, in float32+ (as `columns`). Reduced
    tile by tile; the column LSE covers this rank's rows only. With `positive` (the own block),
    the diagonal logits are copied into it from the very tiles the LSEs come from, so that
    LSE ≥ positive holds exactly and the loss is never negative from rounding; with
    `leave_one_out` the diagonal logits are then left out of both LSEs. `column_bias` (columns,)
    is added to every row's logits: −inf leaves a column out of every LSE (its own is −inf).
    `tile_hook` then sees every tile's logits (it must leave them as they are).
    """
    buffers = _TileBuffers(xs, columns, tile_size, row_lse.dtype)
    col_lse = xs.new_full((columns.shape[0],), float("-inf"), dtype=row_lse.dtype)
    for i in _tiles(xs.shape[0], tile_size):
        for j in _tiles(columns.shape[0], tile_size):
            logits = buffers.logits(xs[i], columns[j], _part(column_bias, j))
            if positive is not None and i == j:
                positive[i] = logits.diagonal()
                if leave_one_out:
                    logits.diagonal().fill_(float("-inf"))
            scratch = buffers.scratch(logits)
            tile_row_lse, row_peak = _lse(logits, 1, scratch)
            torch.logaddexp(row_lse[i], tile_row_lse, out=row_lse[i])
            if with_columns:
                tile_col_lse = _column_lse(logits, scratch, row_peak)
                torch.logaddexp(col_lse[j], tile_col_lse, out=col_lse[j])
            if tile_hook is not None:
                tile_hook(i, j, logits, buffers.scratch(logits, 2))
    return col_lse if with_columns else None


def _block_softmax_grads(
    xs: Tensor,
    x: Tensor,
    columns: Tensor,
    tile_size: int,
    *,
    row_lse: Tensor,
    col_lse: Tensor | None,
    dx: Tensor,
    without_diagonal: bool = False,
    column_bias: Tensor | None = None,
    row_weight: Tensor | None = None,
    col_weight: Tensor | None = None,
    tile_hook: TileHook | None = None,
) -> Tensor:
    """Probability-weighted sums of one block's tiles: dx += P·c; returns Pᵀ·x.

    P = exp(xs·cᵀ − row_lse) [+ exp(xs·cᵀ − col_lse)] is recomputed from the saved LSEs; the
    caller multiplies by the incoming gradient and the scale afterwards (once per block, not
    once per tile), and gets the scale's gradient from Σ x ⊙ dx. `without_diagonal` (the home
    block of the leave-one-out softmax): the diagonal tiles' diagonals get no probability.
    `column_bias` as in `_block_lse`; `row_weight` (rows,) and `col_weight` (columns,) weight
    the row and the column probabilities (the incoming gradients of the two LSEs);
    `tile_hook` may add further terms to each tile's P in place before it is used.
    """
    buffers = _TileBuffers(xs, columns, tile_size, row_lse.dtype)
    dcols = _zeros(x, row_lse.dtype, columns.shape)
    for i in _tiles(xs.shape[0], tile_size):
        for j in _tiles(columns.shape[0], tile_size):
            logits = buffers.logits(xs[i], columns[j], _part(column_bias, j))
            if without_diagonal and i == j:
                logits.diagonal().fill_(float("-inf"))
            p = torch.sub(logits, row_lse[i, None], out=buffers.scratch(logits)).exp_()
            if row_weight is not None:
                p.mul_(row_weight[i, None])
            if col_lse is not None:
                q = logits.sub_(col_lse[None, j]).exp_()
                p += q if col_weight is None else q.mul_(col_weight[None, j])
            if tile_hook is not None:
                tile_hook(i, j, p, buffers.scratch(logits, 2))
            dx[i].addmm_(p, columns[j])
            dcols[j].addmm_(p.T, x[i])
    return dcols


def _block_sigmoid(
    xs: Tensor,
    x: Tensor,
    columns: Tensor,
    bias: Tensor,
    tile_size: int,
    *,
    loss: Tensor,
    grads: tuple[Tensor, Tensor] | None,
) -> Tensor | None:
    """Add Σ softplus(xs·cᵀ + bias) to `loss` and, if asked, the sums its gradients need.

    grads = (dx, dbias) accumulators: dx += σ·c, dbias += Σ σ; returns σᵀ·x (the caller
    multiplies by the scale, and gets the scale's gradient from Σ x ⊙ dx), or None when
    gradients are not asked for.
    """
    buffers = _TileBuffers(xs, columns, tile_size, loss.dtype)
    dcols = None if grads is None else _zeros(x, loss.dtype, columns.shape)
    for i in _tiles(xs.shape[0], tile_size):
        for j in _tiles(columns.shape[0], tile_size):
            logits = buffers.logits(xs[i], columns[j], bias)
            loss += _softplus_sum(logits, buffers.scratch(logits), buffers.scratch(logits, 2))
            if grads is not None and dcols is not None:
                dx, dbias = grads
                p = logits.sigmoid_()
                dbias += p.sum()
                dx[i].addmm_(p, columns[j])
                dcols[j].addmm_(p.T, x[i])
    return dcols


def _without_autocast(t: Tensor) -> torch.autocast:
    """Tiles use the features' own dtype whatever autocast says, so that the forward and the
    recomputing backward see the very same logits."""
    return torch.autocast(t.device.type, enabled=False)


def _add_(part: Tensor, earlier: Tensor) -> Tensor:
    return part.add_(earlier)


def _logaddexp_(part: Tensor, earlier: Tensor) -> Tensor:
    return torch.logaddexp(part, earlier, out=part)


class _RingSoftmaxLoss(torch.autograd.Function):
    """Global-batch CLIP/NegCLIP loss (leave-one-out: DCL / InfoLOOB); see the module
    docstring for gradient semantics."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        y: Tensor,
        n: Tensor | None,
        logit_scale: Tensor,
        ring: Ring,
        tile_size: int,
        leave_one_out: bool,
    ) -> Tensor:
        with _without_autocast(x):
            dtype = _acc_dtype(x.dtype)
            s = logit_scale.detach().to(dtype).reshape(())
            xs = x.to(dtype) * s
            row_lse = x.new_full((x.shape[0],), float("-inf"), dtype=dtype)
            positive = x.new_empty((x.shape[0],), dtype=dtype)  # s·x_i·y_i, from the tiles

            def visit(block: list[Tensor]) -> list[Tensor]:
                own = positive if block[0] is y else None
                col_lse = _block_lse(
                    xs,
                    block[0].to(dtype),
                    tile_size,
                    row_lse=row_lse,
                    with_columns=True,
                    positive=own,
                    leave_one_out=leave_one_out,
                )
                if n is not None:
                    _block_lse(
                        xs, block[1].to(dtype), tile_size, row_lse=row_lse, with_columns=False
                    )
                return [col_lse]

            (col_lse,) = ring_pass(ring, [y] if n is None else [y, n], visit, _logaddexp_)
            global_batch = ring.size * x.shape[0]
            # This rank's rows' and columns' share of the global loss; the shares sum to L.
            share = ((row_lse - positive).sum() + (col_lse - positive).sum()) / (2 * global_batch)
            ctx.save_for_backward(x, y, n, logit_scale, row_lse, col_lse)
            ctx.ring, ctx.tile_size, ctx.leave_one_out = ring, tile_size, leave_one_out
            return ring.all_reduce_sum(share)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        x, y, n, logit_scale, row_lse, col_lse = ctx.saved_tensors
        with _without_autocast(x):
            ring: Ring = ctx.ring
            dtype = row_lse.dtype
            s = logit_scale.detach().to(dtype).reshape(())
            xf, yf = x.to(dtype), y.to(dtype)
            xs = xf * s  # the forward's very operands, so the tiles' logits are the same
            global_batch = ring.size * x.shape[0]
            # × W: DDP divides the summed per-rank gradients by W (see module docstring).
            coef = grad_loss.to(dtype) * ring.size / (2 * global_batch)
            p_sums = _zeros(x, dtype, x.shape)  # Σ_j P_ij·c_j over every block's columns

            def block_grads(
                columns: Tensor, col_lse_block: Tensor | None, home: bool = False
            ) -> Tensor:
                return _block_softmax_grads(
                    xs,
                    xf,
                    columns.to(dtype),
                    ctx.tile_size,
                    row_lse=row_lse,
                    col_lse=col_lse_block,
                    dx=p_sums,
                    without_diagonal=home and ctx.leave_one_out,
                ).mul_(coef * s)

            def visit(block: list[Tensor]) -> list[Tensor]:
                dy_block = block_grads(block[0], block[-1], home=block[0] is y)
                return [dy_block] if n is None else [dy_block, block_grads(block[1], None)]

            block = [y, col_lse] if n is None else [y, n, col_lse]
            column_grads = ring_pass(ring, block, visit, _add_)
            # dL/dlogit_ij = coef·P_ij, and the positive pairs have an extra −2·coef (−1/(2B)
            # per direction); logit_ij = s·x_i·c_j, so ds = coef·Σ P ⊙ x·cᵀ = coef·Σ x ⊙ p_sums.
            minus_positive = -2 * coef * s
            ds = coef * (_flat_dot(xf, p_sums) - 2 * _flat_dot(xf, yf))
            dx = p_sums.mul_(coef * s).addcmul_(yf, minus_positive)
            dy = column_grads[0].addcmul_(xf, minus_positive)
            dn = None if n is None else column_grads[1].to(n.dtype)
            grad_scale = ds.to(logit_scale.dtype).reshape(logit_scale.shape)
            return dx.to(x.dtype), dy.to(y.dtype), dn, grad_scale, None, None, None


class _RingSigmoidLoss(torch.autograd.Function):
    """Global-batch SigLIP loss; see the module docstring for gradient semantics.

    The sigmoid loss has no normaliser, so its gradient is linear in the incoming gradient and
    known after a single ring pass: the forward computes it along with the loss (O(b·D) kept,
    one pass over S instead of a forward pass plus a recomputing backward pass) and the backward
    only scales it.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        y: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor,
        ring: Ring,
        tile_size: int,
        with_grads: bool,
    ) -> Tensor:
        with _without_autocast(x):
            dtype = _acc_dtype(x.dtype)
            s = logit_scale.detach().to(dtype).reshape(())
            bias = logit_bias.detach().to(dtype).reshape(())
            xf, yf = x.to(dtype), y.to(dtype)
            xs = xf * s
            loss_sum = _zeros(x, dtype)
            grads = (_zeros(x, dtype, x.shape), _zeros(x, dtype)) if with_grads else None

            def visit(block: list[Tensor]) -> list[Tensor]:
                dy_block = _block_sigmoid(
                    xs, xf, block[0].to(dtype), bias, tile_size, loss=loss_sum, grads=grads
                )
                return [] if dy_block is None else [dy_block]

            column_grads = ring_pass(ring, [y], visit, _add_)
            # Σ_pairs −logsigmoid(±logit) = Σ_pairs softplus(logit) − Σ_diagonal logit.
            positive_sim = _flat_dot(xf, yf)
            num_rows = x.shape[0]
            global_batch = ring.size * num_rows
            share = (loss_sum - s * positive_sim - num_rows * bias) / global_batch
            if grads is not None:
                (dx, dbias), (dy,) = grads, column_grads
                # d/dlogit = (sigmoid(logit) − [diagonal]) / B, × W for DDP's mean over ranks;
                # logit_ij = s·x_i·y_j + bias, so ds = Σ σ ⊙ x·yᵀ − Σ x_i·y_i = Σ x ⊙ dx − ….
                coef = ring.size / global_batch
                ds = (_flat_dot(xf, dx) - positive_sim).mul_(coef)
                ctx.save_for_backward(
                    dx.mul_(s).addcmul_(yf, -s).mul_(coef),
                    dy.mul_(s).addcmul_(xf, -s).mul_(coef),
                    ds,
                    dbias.sub_(num_rows).mul_(coef),
                )
            ctx.input_meta = [(t.dtype, t.shape) for t in (x, y, logit_scale, logit_bias)]
            return ring.all_reduce_sum(share)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        grads = [
            (grad_loss.to(g.dtype) * g).to(dtype).reshape(shape)
            for g, (dtype, shape) in zip(ctx.saved_tensors, ctx.input_meta, strict=True)
        ]
        return (*grads, None, None, None)


class _RingLSE(torch.autograd.Function):
    """Row and column log-sum-exps of S = s·X·Cᵀ over the global batch, with exact gradients.

    x: this rank's rows (b, D); c: its columns (m, D); column_bias (m,) in float32+, 0 or −inf
    (a −inf column is in no LSE: padding). Returns (row_lse, col_lse), float32+: the LSE of
    this rank's rows over every rank's columns (b,) and of its columns over every rank's rows
    (m,; −inf for a left-out column). m, like b and D, must be equal on every rank.

    Gradients: every rank runs backward with the incoming gradients of its own outputs,
    (g_row, g_col). Rank r gets the gradient of Σ_r' (g_row_r'·row_lse_r' + g_col_r'·col_lse_r')
    with respect to its x and c (g_col travels with its column block, and each block's
    gradient is summed over every rank's rows as it travels back to its owner), and its own
    rows' share of the gradient with respect to s. So if every rank back-propagates W × its
    share of a loss L, each gets W·dL/d(its features) and W × its rows' share of dL/ds: the
    semantics of the module docstring.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, c: Tensor, column_bias: Tensor, logit_scale: Tensor, ring: Ring,
        tile_size: int
    ) -> tuple[Tensor, Tensor]:
        with _without_autocast(x):
            dtype = column_bias.dtype
            xs = x.to(dtype) * logit_scale.detach().to(dtype).reshape(())
            row_lse = x.new_full((x.shape[0],), float("-inf"), dtype=dtype)

            def visit(block: list[Tensor]) -> list[Tensor]:
                columns, bias = block
                return [_block_lse(xs, columns.to(dtype), tile_size, row_lse=row_lse,
                                   with_columns=True, column_bias=bias)]

            (col_lse,) = ring_pass(ring, [c, column_bias], visit, _logaddexp_)
            ctx.save_for_backward(x, c, column_bias, logit_scale, row_lse, col_lse)
            ctx.ring, ctx.tile_size = ring, tile_size
            return row_lse, col_lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row: Tensor, grad_col: Tensor):
        x, c, column_bias, logit_scale, row_lse, col_lse = ctx.saved_tensors
        with _without_autocast(x):
            dtype = column_bias.dtype
            s = logit_scale.detach().to(dtype).reshape(())
            xf = x.to(dtype)
            xs = xf * s  # the forward's very operands, so the tiles' logits are the same
            p_sums = _zeros(x, dtype, x.shape)  # Σ_j dL/dlogit_ij · c_j over every block
            # A left-out column (logits and LSE −inf) gets no probability: exp(−inf − inf) = 0.
            col_lse = col_lse.masked_fill(col_lse.isneginf(), float("inf"))
            row_weight = grad_row.to(dtype)

            def visit(block: list[Tensor]) -> list[Tensor]:
                columns, bias, lse, col_weight = block
                return [_block_softmax_grads(
                    xs, xf, columns.to(dtype), ctx.tile_size, row_lse=row_lse, col_lse=lse,
                    dx=p_sums, column_bias=bias, row_weight=row_weight, col_weight=col_weight)]

            block = [c, column_bias, col_lse, grad_col.to(dtype)]
            (dc,) = ring_pass(ctx.ring, block, visit, _add_)
            # logit_ij = s·x_i·c_j: dx = s·p_sums, dc = s·Σ_i (…)·x_i, ds = Σ x ⊙ p_sums.
            ds = _flat_dot(xf, p_sums).to(logit_scale.dtype).reshape(logit_scale.shape)
            return (p_sums.mul_(s).to(x.dtype), dc.mul_(s).to(c.dtype), None, ds, None, None)


class _RingSoftTargets(torch.autograd.Function):
    """`_RingLSE` of S = s·X·Yᵀ (no column bias) plus the soft-target sums of CWCL, exact
    gradients.

    x, y: this rank's rows and columns (b, D); q: its detached weight features (b, D'), giving
    w_ij = weight(q_i·q_j) tile by tile (q travels with its column block). Returns, all (b,)
    float32+: row_lse, col_lse (as `_RingLSE`), row_target_i = Σ_j w_ij·S_ij over every rank's
    columns, col_target_j = Σ_i w_ij·S_ij over every rank's rows, and norm_i = Σ_j w_ij (no
    gradient: w is constant). One ring pass computes them all; the backward's ring pass adds
    w_ij·(g_row_target_i + g_col_target_j) to each tile's dL/dS_ij, the rest is `_RingLSE`'s
    backward, with the same gradient semantics.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, y: Tensor, q: Tensor, logit_scale: Tensor,
        weight: Callable[[Tensor], Tensor], ring: Ring, tile_size: int
    ) -> tuple[Tensor, ...]:
        with _without_autocast(x):
            dtype = _acc_dtype(x.dtype)
            xs = x.to(dtype) * logit_scale.detach().to(dtype).reshape(())
            rows_q = q.to(dtype)
            row_lse = x.new_full((x.shape[0],), float("-inf"), dtype=dtype)
            row_target, norm = _zeros(x, dtype, row_lse.shape), _zeros(x, dtype, row_lse.shape)

            def visit(block: list[Tensor]) -> list[Tensor]:
                columns, columns_q = (t.to(dtype) for t in block)
                col_target = _zeros(x, dtype, columns.shape[:1])

                def targets(i: slice, j: slice, logits: Tensor, scratch: Tensor) -> None:
                    w = weight(torch.mm(rows_q[i], columns_q[j].T, out=scratch))
                    norm[i] += w.sum(1)
                    w_logits = torch.mul(w, logits, out=scratch)  # the cosines are used up
                    row_target[i] += w_logits.sum(1)
                    col_target[j] += w_logits.sum(0)

                col_lse = _block_lse(xs, columns, tile_size, row_lse=row_lse, with_columns=True,
                                     tile_hook=targets)
                return [col_lse, col_target]

            col_lse, col_target = ring_pass(ring, [y, q], visit, [_logaddexp_, _add_])
            ctx.save_for_backward(x, y, q, logit_scale, row_lse, col_lse)
            ctx.weight, ctx.ring, ctx.tile_size = weight, ring, tile_size
            ctx.mark_non_differentiable(norm)
            return row_lse, col_lse, row_target, col_target, norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row: Tensor, grad_col: Tensor, grad_row_target: Tensor,
                 grad_col_target: Tensor, _grad_norm: Tensor):
        x, y, q, logit_scale, row_lse, col_lse = ctx.saved_tensors
        with _without_autocast(x):
            dtype = row_lse.dtype
            s = logit_scale.detach().to(dtype).reshape(())
            xf = x.to(dtype)
            xs = xf * s  # the forward's very operands, so the tiles' logits are the same
            rows_q, row_weight = q.to(dtype), grad_row.to(dtype)
            g_row_target = grad_row_target.to(dtype)
            p_sums = _zeros(x, dtype, x.shape)  # Σ_j dL/dS_ij · y_j over every block

            def visit(block: list[Tensor]) -> list[Tensor]:
                columns, columns_q, lse, col_weight, g_col_target = block
                columns_q = columns_q.to(dtype)

                def targets(i: slice, j: slice, p: Tensor, scratch: Tensor) -> None:
                    w = ctx.weight(torch.mm(rows_q[i], columns_q[j].T, out=scratch))
                    p.addcmul_(w, g_row_target[i, None]).addcmul_(w, g_col_target[None, j])

                return [_block_softmax_grads(
                    xs, xf, columns.to(dtype), ctx.tile_size, row_lse=row_lse, col_lse=lse,
                    dx=p_sums, row_weight=row_weight, col_weight=col_weight, tile_hook=targets)]

            block = [y, q, col_lse, grad_col.to(dtype), grad_col_target.to(dtype)]
            (dy,) = ring_pass(ctx.ring, block, visit, _add_)
            # S_ij = s·x_i·y_j: dx = s·p_sums, dy = s·Σ_i (…)·x_i, ds = Σ x ⊙ p_sums.
            ds = _flat_dot(xf, p_sums).to(logit_scale.dtype).reshape(logit_scale.shape)
            return p_sums.mul_(s).to(x.dtype), dy.mul_(s).to(y.dtype), None, ds, None, None, None


def _check(
    x: Tensor, y: Tensor, n: Tensor | None, scalars: Sequence[Tensor], ring: Ring, tile_size: int
) -> None:
    check_local(x, y, n, *scalars)
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1; got {tile_size}")
    check_same_on_every_rank(x, n, ring)


def ring_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    neg_text_features: Tensor | None = None,
    group: ProcessGroup | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    leave_one_out: bool = False,
) -> Tensor:
    """CLIP softmax loss over the global batch (NegCLIP with `neg_text_features`), ring-tiled.

    Args: this rank's L2-normalised image_features (b, D) and text_features (b, D); logit_scale,
    the exponentiated scale (scalar tensor); neg_text_features (b·K, D) or (b, K, D), hard
    negative captions for this rank's images: extra columns of every image's image->text
    softmax (all ranks' negatives, as NegCLIP concatenates them to the text batch), never rows
    of the text->image direction. b, D and K must be equal on every rank. `leave_one_out`:
    each positive is left out of its own row's denominator (DCL / InfoLOOB).

    Returns the loss on the global batch (same value on every rank). Gradients: W × this rank's
    share, so that DDP's mean over ranks gives the global-batch gradient of every parameter (see
    the module docstring). Memory: O((1 + K)·b·D + tile_size²) per rank; tile_size is the rows
    and columns of each logits tile (a trade of memory for matmul efficiency).
    """
    ring = Ring.of(group)
    neg = flat_negatives(neg_text_features, image_features.shape[0])
    _check(image_features, text_features, neg, [logit_scale], ring, tile_size)
    check_leave_one_out(leave_one_out, ring.size * image_features.shape[0])
    return _RingSoftmaxLoss.apply(
        image_features, text_features, neg, logit_scale, ring, tile_size, leave_one_out
    )


def ring_siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    group: ProcessGroup | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> Tensor:
    """SigLIP sigmoid loss over the global batch, ring-tiled.

    -Σ over all B×B pairs of logsigmoid(±(s·x·y + bias)) / B (+ for matching pairs), as open_clip
    `SigLipLoss` on the full batch. Returns that value on every rank; gradients are W × this
    rank's share (see the module docstring). Memory: O(b·D + tile_size²) per rank.
    """
    ring = Ring.of(group)
    _check(image_features, text_features, None, [logit_scale, logit_bias], ring, tile_size)
    inputs = (image_features, text_features, logit_scale, logit_bias)
    # The forward computes gradients too (see _RingSigmoidLoss), but only when they can be used.
    with_grads = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return _RingSigmoidLoss.apply(*inputs, ring, tile_size, with_grads)


def ring_weighted_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    weight_features: Tensor,
    weight: Callable[[Tensor], Tensor],
    group: ProcessGroup | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> Tensor:
    """Weighted (soft-target) softmax loss over the global batch (the cwcl objective), ring-tiled.

    Args: this rank's L2-normalised image_features and text_features (b, D), logit_scale (the
    exponentiated scale), weight_features (b, D'), L2-normalised, detached here, and `weight`,
    the elementwise map of their cosines to target weights: w_ij = weight(f_i·f_j), symmetric,
    w_ii > 0. The loss is `dense_contrastive`'s: with S_ij = s·x_i·y_j and n_i = Σ_j w_ij, image
    row i loses LSE_j(S_ij) − Σ_j w_ij·S_ij / n_i and text row j loses LSE_i(S_ij) −
    Σ_i w_ij·S_ij / n_j (w symmetric: that is −Σ_i w_ji log softmax_i), means over the B rows,
    halved. One ring pass over the text blocks (with their weight features) gives, for this
    rank's rows and columns, both LSEs, both target sums and the normalisers
    (`_RingSoftTargets`); the loss combines them with autograd. b, D, D' must be equal on every
    rank (D' is not compared: the objectives pass one of the two feature sets).

    Returns the loss (same value on every rank); gradients as `ring_clip_loss` (W × this
    rank's share). Memory: O(b·(D + D') + tile_size²) per rank, never (b, B).
    """
    ring = Ring.of(group)
    check_weight_features(weight_features, image_features.shape[0])
    _check(image_features, text_features, None, [logit_scale], ring, tile_size)
    with _without_autocast(image_features):
        row_lse, col_lse, row_target, col_target, norm = _RingSoftTargets.apply(
            image_features, text_features, weight_features.detach(), logit_scale, weight, ring,
            tile_size)
        # norm_i is both row i's and (w symmetric) column i's normaliser.
        rows = (row_lse + col_lse - (row_target + col_target) / norm).sum()
        share = rows / (2 * ring.size * image_features.shape[0])  # sums to L over ranks
    return global_value(ring.size * share, ring)


def ring_multipos_loss(
    image_features: Tensor,
    pos_text_features: Tensor,
    pos_mask: Tensor,
    logit_scale: Tensor,
    *,
    group: ProcessGroup | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> Tensor:
    """Multi-positive softmax loss over the global batch (the multipos objective), ring-tiled.

    Args: this rank's L2-normalised image_features (b, D), its images' positive captions
    pos_text_features (b, K, D) with pos_mask (b, K) bool (False: padding), logit_scale (the
    exponentiated scale). The loss is `dense_contrastive`'s: ½ [mean over the B images of
    LSE(image over all real captions) − mean of its positives' logits, + mean over the C real
    captions of LSE(caption over all images) − its own image's logit]. The positives' logits
    are local (plain autograd); one ring pass over the caption blocks (b·K, D), padding left
    out by a −inf column bias, gives both denominators (`_RingLSE`): the rows' LSE for
    image→text, the columns' for text→image. B = W·b; C, the global count of real captions,
    is all-reduced (ranks may hold different counts). b, K and D must be equal on every rank.

    Returns the loss (same value on every rank); gradients as `ring_clip_loss` (W × this
    rank's share). Memory: O(K·b·D + tile_size²) per rank, never (b, B·K).
    """
    ring = Ring.of(group)
    check_positives(image_features, pos_text_features, pos_mask)
    b, k, d = pos_text_features.shape
    captions = pos_text_features.reshape(b * k, d)
    _check(image_features, pos_text_features[:, 0], captions, [logit_scale], ring, tile_size)
    with _without_autocast(image_features):
        dtype = _acc_dtype(image_features.dtype)
        column_bias = torch.zeros(b * k, dtype=dtype, device=image_features.device)
        column_bias.masked_fill_(~pos_mask.reshape(-1), float("-inf"))
        row_lse, col_lse = _RingLSE.apply(
            image_features, captions, column_bias, logit_scale, ring, tile_size)
        positive = logit_scale.to(dtype) * torch.einsum(  # s·x_i·y_ik (b, K)
            "bd,bkd->bk", image_features.to(dtype), pos_text_features.to(dtype))
        mean_positive = torch.where(pos_mask, positive, 0).sum(1) / pos_mask.sum(1)
        image_to_text = (row_lse - mean_positive).sum() / (ring.size * b)
        num_captions = ring.all_reduce_sum(pos_mask.sum().to(dtype))
        text_to_image = torch.where(pos_mask, col_lse.view(b, k) - positive, 0).sum()
        share = (image_to_text + text_to_image / num_captions) / 2  # sums to L over ranks
    return global_value(ring.size * share, ring)
