"""Dense contrastive losses: the `local` backend (one process) and the `gather` backend.

Shapes: b local batch, W world size, B = W·b global batch, D feature dim, K hard negatives per
image. x: image features (b, D), y: text features (b, D), n: negatives (b·K, D); all L2-normalised.
s: logit scale (already exponentiated), t: logit bias; both scalar tensors.

Losses on the global batch (the definitions every backend implements):
- softmax (CLIP; NegCLIP with negatives): mean over the B images of CE(image -> [all texts, all
  negatives]) plus mean over the B texts of CE(text -> all images), halved. Equals open_clip
  `ClipLoss` on the full batch; negatives are extra columns of the image->text direction only.
- softmax with `leave_one_out=True` (DCL, Yeh et al. 2022; InfoLOOB, Fürst et al. 2022): the
  same, but each row's positive is left out of its own denominator: per row, −s·x_i·y_i +
  logsumexp over the row's other columns (hard negatives stay in). Unlike InfoNCE it can be
  negative and is unbounded below.
- weighted softmax (CWCL, Srinivasa et al. 2023): the softmax with soft targets. Given (B, B)
  weights w (w_ij ≥ 0, w_ii > 0, symmetric), per row −Σ_j w_ij log softmax_j(logits_i) / Σ_j w_ij,
  in both directions (image rows against text columns and text rows against image columns,
  the same w), halved. With w = identity it is the softmax (CLIP) loss. No hard negatives.
- multi-positive softmax (`multipos`; K positive captions per image, mask m marking the real
  ones): image->text: mean over the B images of −mean_{p∈P(i)} log softmax_i(p) over all the
  batch's real captions (the target mass spread uniformly over the image's own positives, the
  multi-positive / SupCon form); text->image: mean over the real captions of CE(caption ->
  all images, its own image); halved. With K = 1 it is the softmax (CLIP) loss.
- sigmoid (SigLIP): -sum over all B×B pairs of logsigmoid(±(s x·y + t)) / B, + on the diagonal.
  Equals open_clip `SigLipLoss` on the full batch.

The gather backend materialises (b, B) logits per rank: simple, but memory grows with b·B.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from vlp.distributed.collectives import Ring, all_gather_with_grad, global_value
from vlp.distributed.shapes import (
    check_leave_one_out,
    check_local,
    check_positives,
    check_same_on_every_rank,
    check_weight_features,
    flat_negatives,
)


def softmax_rows_loss(
    image_rows: Tensor,
    text_rows: Tensor,
    all_image: Tensor,
    all_text: Tensor,
    logit_scale: Tensor,
    *,
    all_neg_text: Tensor | None = None,
    offset: int = 0,
    leave_one_out: bool = False,
) -> Tensor:
    """Softmax loss of b rows against all B columns, averaged over the b rows.

    Row i's positive is column offset + i. With rows = all columns this is the full loss.
    `leave_one_out`: the positive is not in its row's denominator (DCL / InfoLOOB).
    """
    columns = all_text if all_neg_text is None else torch.cat([all_text, all_neg_text])
    logits_per_image = logit_scale * image_rows @ columns.T  # (b, B + B·K)
    logits_per_text = logit_scale * text_rows @ all_image.T  # (b, B)
    labels = torch.arange(image_rows.shape[0], device=image_rows.device) + offset
    rows_loss = _leave_one_out_loss if leave_one_out else F.cross_entropy
    return (rows_loss(logits_per_image, labels) + rows_loss(logits_per_text, labels)) / 2


def _leave_one_out_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """mean_i [logsumexp_{j ≠ labels_i} logits_ij − logits_i,labels_i]: the DCL / InfoLOOB row
    loss, whose denominator leaves the positive out."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    positive = logits[rows, labels]
    others = logits.index_put((rows, labels), logits.new_tensor(float("-inf")))
    return (torch.logsumexp(others, dim=1) - positive).mean()


def weighted_rows_loss(
    image_rows: Tensor,
    text_rows: Tensor,
    all_image: Tensor,
    all_text: Tensor,
    logit_scale: Tensor,
    weights: Tensor,
) -> Tensor:
    """Soft-target softmax loss of b rows against all B columns, averaged over the b rows.

    `weights` (b, B): row i's weight of every column (in both directions); each row is
    normalised to sum to 1, so a row's loss is −Σ_j w_ij log softmax_j / Σ_j w_ij.
    """
    targets = weights / weights.sum(dim=1, keepdim=True)
    logits_per_image = logit_scale * image_rows @ all_text.T  # (b, B)
    logits_per_text = logit_scale * text_rows @ all_image.T  # (b, B)
    return (F.cross_entropy(logits_per_image, targets)
            + F.cross_entropy(logits_per_text, targets)) / 2


def target_weights(rows: Tensor, columns: Tensor, weight: Callable[[Tensor], Tensor]) -> Tensor:
    """weight(cos(rows_i, columns_j)) (b, B) from L2-normalised features, detached: no gradient
    flows through the targets."""
    return weight(rows.detach() @ columns.detach().T)


def multipos_rows_loss(
    image_rows: Tensor,
    pos_rows: Tensor,
    mask_rows: Tensor,
    all_image: Tensor,
    all_pos: Tensor,
    all_mask: Tensor,
    logit_scale: Tensor,
    *,
    offset: int = 0,
    world_size: int = 1,
) -> Tensor:
    """This rank's share of the multi-positive softmax loss, times `world_size`: b image rows
    and their b·K caption rows against all B images and B·K captions (padding masked out).

    Image rows (b, D), positives (b, K, D) and mask (b, K) bool; `all_*` the same for the global
    batch, in rank order. Row i's own positives are all_pos[offset + i]. The mean over ranks of
    the returned values is the global loss (the text->image mean divides by the global count
    of real captions).
    """
    b, k, d = pos_rows.shape
    rows = torch.arange(b, device=image_rows.device)
    logits = logit_scale * image_rows @ all_pos.reshape(-1, d).T  # (b, B·K)
    logits = logits.masked_fill(~all_mask.reshape(1, -1), float("-inf"))
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).reshape(b, -1, k)
    own = torch.where(mask_rows, log_prob[rows, rows + offset], 0.0)  # (b, K)
    image_to_text = (-own.sum(1) / mask_rows.sum(1)).mean()

    logits_per_text = logit_scale * pos_rows.reshape(-1, d) @ all_image.T  # (b·K, B)
    labels = (rows + offset).repeat_interleave(k)
    per_caption = F.cross_entropy(logits_per_text, labels, reduction="none")
    num_captions = all_mask.sum().to(per_caption.dtype)  # real captions in the global batch
    text_to_image = torch.where(mask_rows.reshape(-1), per_caption, 0.0).sum() * (
        world_size / num_captions)
    return (image_to_text + text_to_image) / 2


def sigmoid_rows_loss(
    image_rows: Tensor,
    all_text: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    offset: int = 0,
) -> Tensor:
    """Sigmoid loss of b image rows against all B texts, summed over pairs and divided by b."""
    logits = logit_scale * image_rows @ all_text.T + logit_bias  # (b, B)
    rows = torch.arange(image_rows.shape[0], device=image_rows.device)
    labels = -torch.ones_like(logits)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / image_rows.shape[0]


def local_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    neg_text_features: Tensor | None = None,
    leave_one_out: bool = False,
) -> Tensor:
    """Softmax (CLIP / NegCLIP) loss of one process's batch; no collectives."""
    check_local(image_features, text_features, neg_text_features, logit_scale)
    neg = flat_negatives(neg_text_features, image_features.shape[0])
    check_leave_one_out(leave_one_out, image_features.shape[0])
    return softmax_rows_loss(
        image_features,
        text_features,
        image_features,
        text_features,
        logit_scale,
        all_neg_text=neg,
        leave_one_out=leave_one_out,
    )


def local_weighted_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    weight_features: Tensor,
    weight: Callable[[Tensor], Tensor],
) -> Tensor:
    """Weighted softmax (CWCL) loss of one process's batch: w_ij = weight(f_i·f_j) of the
    L2-normalised `weight_features` f (b, D'), detached; no collectives."""
    check_local(image_features, text_features, None, logit_scale)
    check_weight_features(weight_features, image_features.shape[0])
    weights = target_weights(weight_features, weight_features, weight)
    return weighted_rows_loss(
        image_features, text_features, image_features, text_features, logit_scale, weights
    )


def local_multipos_loss(
    image_features: Tensor, pos_text_features: Tensor, pos_mask: Tensor, logit_scale: Tensor
) -> Tensor:
    """Multi-positive softmax loss of one process's batch; no collectives."""
    check_local(image_features, pos_text_features[:, 0], None, logit_scale)
    check_positives(image_features, pos_text_features, pos_mask)
    return multipos_rows_loss(image_features, pos_text_features, pos_mask, image_features,
                              pos_text_features, pos_mask, logit_scale)


def local_siglip_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
) -> Tensor:
    """Sigmoid (SigLIP) loss of one process's batch; no collectives."""
    check_local(image_features, text_features, None, logit_scale, logit_bias)
    return sigmoid_rows_loss(image_features, text_features, logit_scale, logit_bias)


def gather_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    neg_text_features: Tensor | None = None,
    group: ProcessGroup | None = None,
    leave_one_out: bool = False,
) -> Tensor:
    """Softmax loss on the global batch, open_clip style (all-gather with grad, local rows).

    Value: the global-batch loss, on every rank.
    Gradients: rank r back-propagates L_r = its b rows' share of the global loss times W (the
    mean over its rows). The all-gather's backward sums every rank's contribution to rank r's
    columns, so rank r's features get W·dL/d(its features) and its logit_scale gets
    W·(its rows' share of dL/ds). DDP's mean over ranks then gives exactly dL/dθ for every
    parameter. (Gathering with grad but computing all B rows on every rank would give W·dL/dθ.)
    """
    check_local(image_features, text_features, neg_text_features, logit_scale)
    neg = flat_negatives(neg_text_features, image_features.shape[0])
    ring = Ring.of(group)
    check_same_on_every_rank(image_features, neg, ring)
    check_leave_one_out(leave_one_out, ring.size * image_features.shape[0])
    rank_loss = softmax_rows_loss(
        image_features,
        text_features,
        all_gather_with_grad(image_features, ring),
        all_gather_with_grad(text_features, ring),
        logit_scale,
        all_neg_text=None if neg is None else all_gather_with_grad(neg, ring),
        offset=ring.rank * image_features.shape[0],
        leave_one_out=leave_one_out,
    )
    return global_value(rank_loss, ring)


def gather_weighted_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    weight_features: Tensor,
    weight: Callable[[Tensor], Tensor],
    group: ProcessGroup | None = None,
) -> Tensor:
    """Weighted softmax (CWCL) loss on the global batch: this rank's rows against all columns;
    the weights of its rows come from its `weight_features` and every rank's (gathered,
    detached). Value and gradient semantics as `gather_clip_loss`."""
    check_local(image_features, text_features, None, logit_scale)
    check_weight_features(weight_features, image_features.shape[0])
    ring = Ring.of(group)
    check_same_on_every_rank(image_features, None, ring)
    all_weight_features = all_gather_with_grad(weight_features.detach(), ring)
    rank_loss = weighted_rows_loss(
        image_features,
        text_features,
        all_gather_with_grad(image_features, ring),
        all_gather_with_grad(text_features, ring),
        logit_scale,
        target_weights(weight_features, all_weight_features, weight),
    )
    return global_value(rank_loss, ring)


def gather_multipos_loss(
    image_features: Tensor,
    pos_text_features: Tensor,
    pos_mask: Tensor,
    logit_scale: Tensor,
    *,
    group: ProcessGroup | None = None,
) -> Tensor:
    """Multi-positive softmax loss on the global batch: all-gather images and positives with
    grad (the mask without), this rank's image and caption rows.

    Value and gradient semantics as `gather_clip_loss`: the value is the global loss on every
    rank; each rank's gradients are W × its rows' share, so DDP's mean gives dL/dθ.
    """
    check_local(image_features, pos_text_features[:, 0], None, logit_scale)
    check_positives(image_features, pos_text_features, pos_mask)
    ring = Ring.of(group)
    b, k, d = pos_text_features.shape
    check_same_on_every_rank(image_features, pos_text_features.reshape(b * k, d), ring)
    all_mask = all_gather_with_grad(pos_mask.to(image_features.dtype), ring) > 0.5
    rank_loss = multipos_rows_loss(
        image_features,
        pos_text_features,
        pos_mask,
        all_gather_with_grad(image_features, ring),
        all_gather_with_grad(pos_text_features, ring),
        all_mask,
        logit_scale,
        offset=ring.rank * b,
        world_size=ring.size,
    )
    return global_value(rank_loss, ring)


def gather_siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    group: ProcessGroup | None = None,
) -> Tensor:
    """Sigmoid loss on the global batch: all-gather texts with grad, this rank's image rows.

    Value and gradient semantics as `gather_clip_loss`: the value is the global loss on every
    rank; each rank's gradients are W × its rows' share, so DDP's mean gives dL/dθ.
    """
    check_local(image_features, text_features, None, logit_scale, logit_bias)
    ring = Ring.of(group)
    check_same_on_every_rank(image_features, None, ring)
    rank_loss = sigmoid_rows_loss(
        image_features,
        all_gather_with_grad(text_features, ring),
        logit_scale,
        logit_bias,
        offset=ring.rank * image_features.shape[0],
    )
    return global_value(rank_loss, ring)
