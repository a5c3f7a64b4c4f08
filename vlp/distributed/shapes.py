"""Input checks shared by the contrastive backends.

Shapes: b local batch, D feature dim, K hard negatives (multipos: positive captions) per image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlp.distributed.collectives import Ring


def flat_negatives(neg_text_features: Tensor | None, batch_size: int) -> Tensor | None:
    """Hard negatives as (b·K, D) rows, accepting (b·K, D) or (b, K, D)."""
    if neg_text_features is None:
        return None
    if neg_text_features.dim() == 3:
        if neg_text_features.shape[0] != batch_size:
            raise ValueError(
                f"neg_text_features has shape {tuple(neg_text_features.shape)}; "
                f"expected (b, K, D) with b = {batch_size}"
            )
        return neg_text_features.reshape(-1, neg_text_features.shape[-1])
    if neg_text_features.dim() != 2 or neg_text_features.shape[0] % batch_size:
        raise ValueError(
            f"neg_text_features has shape {tuple(neg_text_features.shape)}; expected (b·K, D) "
            f"or (b, K, D) with b = {batch_size}"
        )
    return neg_text_features


def check_local(
    image_features: Tensor,
    text_features: Tensor,
    neg_text_features: Tensor | None,
    *scalars: Tensor,
) -> None:
    """Raise ValueError unless features are (b, D) pairs, negatives (b·K, D), scalars 1 element."""
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both be (b, D); got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if neg_text_features is not None and neg_text_features.shape[-1] != image_features.shape[1]:
        raise ValueError(
            f"neg_text_features has dim {neg_text_features.shape[-1]}, "
            f"features have dim {image_features.shape[1]}"
        )
    for scalar in scalars:
        if scalar.numel() != 1:
            raise ValueError(f"logit scale/bias must be scalar tensors; got {tuple(scalar.shape)}")


_AGREED: dict[int, tuple[object, set[tuple[int, int, int]]]] = {}
"""Per process group (by id, the group kept alive): the (b, D, K) every rank has agreed on."""


def check_same_on_every_rank(
    image_features: Tensor, neg_text_features: Tensor | None, ring: Ring
) -> None:
    """Raise ValueError unless b, D and K agree on every rank (ring and gather need equal blocks).

    The ranks compare shapes (one small all-gather and a host read) only the first time this
    rank meets a (b, D, K) in this group; later calls with a shape the ranks agreed on cost
    nothing, so a training step has no host sync here. With equal per-rank batches (vlp's data
    pipeline only yields full batches; elsewhere use drop_last / accelerate's even_batches) every
    rank meets a new shape on the same call, so they all take part. A rank whose shape changes
    while the others' do not would wait in the all-gather while they wait in the ring: give
    every rank the same b on every call.
    """
    if ring.size == 1:
        return
    b, d = image_features.shape
    num_neg = -1 if neg_text_features is None else neg_text_features.shape[0] // b
    group = ring.process_group()
    _, agreed = _AGREED.setdefault(id(group), (group, set()))
    if (b, d, num_neg) in agreed:
        return
    shapes = ring.all_gather_ints((b, d, num_neg), device=image_features.device)
    if any(s != shapes[0] for s in shapes):
        listed = ", ".join(f"rank {r}: b={s[0]} D={s[1]} K={s[2]}" for r, s in enumerate(shapes))
        raise ValueError(
            "contrastive backends 'gather' and 'ring' need the same local batch size b, feature "
            f"dim D and negatives (multipos: positives) per image K on every rank (K=-1: none); "
            f"got {listed}. "
            "Use drop_last / equal per-rank batches."
        )
    agreed.add((b, d, num_neg))


def check_leave_one_out(leave_one_out: bool, global_batch: int) -> None:
    """A leave-one-out softmax (DCL / InfoLOOB) needs a negative in every row: B >= 2."""
    if leave_one_out and global_batch < 2:
        raise ValueError(
            f"the leave-one-out softmax (DCL / InfoLOOB) needs a global batch of at least 2 "
            f"pairs, got {global_batch}: a row without negatives has an empty denominator"
        )


def check_weight_features(weight_features: Tensor, batch_size: int) -> None:
    """The features that give soft-target weights (CWCL) are (b, D') rows, one per pair."""
    if weight_features.dim() != 2 or weight_features.shape[0] != batch_size:
        raise ValueError(
            f"weight_features has shape {tuple(weight_features.shape)}; expected (b, D') with "
            f"b = {batch_size}"
        )


def check_positives(image_features: Tensor, pos_text_features: Tensor, pos_mask: Tensor) -> None:
    """Raise ValueError unless positives are (b, K, D) with a (b, K) bool mask (whose first
    column, the `txt` caption, the data pipeline always sets)."""
    b, d = image_features.shape
    if pos_text_features.dim() != 3 or pos_text_features.shape[::2] != (b, d):
        raise ValueError(f"pos_text_features has shape {tuple(pos_text_features.shape)}; "
                         f"expected (b, K, D) with b = {b}, D = {d}")
    if pos_mask.dtype != torch.bool or pos_mask.shape != pos_text_features.shape[:2]:
        raise ValueError(f"pos_mask must be a bool (b, K) = {tuple(pos_text_features.shape[:2])} "
                         f"tensor; got {pos_mask.dtype} {tuple(pos_mask.shape)}")
