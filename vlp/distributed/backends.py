"""Contrastive backends: how the objectives' softmax and sigmoid terms see the global batch.

Shapes: b local batch, D feature dim, K hard negatives per image.

Every backend takes this rank's L2-normalised features and returns the loss on the global batch;
after DDP's mean over ranks every parameter gradient equals that of the loss computed on the
whole global batch in one process (docs/design.md §3). Backends:

- local:  the batch of this process only (one process, no collectives).
- gather: all-gather features with grad, (b, B) logits per rank (open_clip style).
- ring:   ring-passed column blocks, tiled logits, O(b·D + tile²) memory per rank.
- auto:   ring when torch.distributed is initialised with world size > 1, else local.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor
from torch.distributed import ProcessGroup

from vlp.distributed.collectives import Ring
from vlp.distributed.dense_contrastive import (
    gather_clip_loss,
    gather_multipos_loss,
    gather_siglip_loss,
    gather_weighted_clip_loss,
    local_clip_loss,
    local_multipos_loss,
    local_siglip_loss,
    local_weighted_clip_loss,
)
from vlp.distributed.ring_contrastive import (
    DEFAULT_TILE_SIZE,
    ring_clip_loss,
    ring_multipos_loss,
    ring_siglip_loss,
    ring_weighted_clip_loss,
)


class ContrastiveBackend(Protocol):
    """What the objectives call for every contrastive term."""

    name: str

    def softmax(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        *,
        neg_text_features: Tensor | None = None,
        leave_one_out: bool = False,
    ) -> Tensor:
        """CLIP loss (NegCLIP with (b·K, D) or (b, K, D) hard-negative captions); with
        `leave_one_out` each positive is left out of its own denominator (DCL / InfoLOOB)."""
        ...

    def multi_positive(
        self, image_features: Tensor, pos_text_features: Tensor, pos_mask: Tensor,
        logit_scale: Tensor
    ) -> Tensor:
        """Multi-positive softmax loss: (b, K, D) positive captions per image, (b, K) bool mask
        of the real ones (`vlp.distributed.dense_contrastive`)."""
        ...

    def sigmoid(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        """SigLIP loss."""
        ...

    def weighted_softmax(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        *,
        weight_features: Tensor,
        weight: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """Softmax with soft targets (CWCL): row i's target over columns j is w_ij / Σ_j w_ij,
        w_ij = weight(f_i·f_j) of the detached, L2-normalised `weight_features` f (b, D')."""
        ...


@dataclass(frozen=True)
class LocalBackend:
    """Dense loss on this process's batch; the global batch only when there is one process."""

    name: str = "local"

    def softmax(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        *,
        neg_text_features: Tensor | None = None,
        leave_one_out: bool = False,
    ) -> Tensor:
        return local_clip_loss(
            image_features,
            text_features,
            logit_scale,
            neg_text_features=neg_text_features,
            leave_one_out=leave_one_out,
        )

    def multi_positive(
        self, image_features: Tensor, pos_text_features: Tensor, pos_mask: Tensor,
        logit_scale: Tensor
    ) -> Tensor:
        return local_multipos_loss(image_features, pos_text_features, pos_mask, logit_scale)

    def sigmoid(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        return local_siglip_loss(image_features, text_features, logit_scale, logit_bias)

    def weighted_softmax(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        *,
        weight_features: Tensor,
        weight: Callable[[Tensor], Tensor],
    ) -> Tensor:
        return local_weighted_clip_loss(image_features, text_features, logit_scale,
                                        weight_features=weight_features, weight=weight)


@dataclass(frozen=True)
class GatherBackend:
    """All-gather with grad; each rank computes its rows against all columns."""

    group: ProcessGroup | None = None
    name: str = "gather"

    def softmax(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        *,
        neg_text_features: Tensor | None = None,
        leave_one_out: bool = False,
    ) -> Tensor:
        return gather_clip_loss(
            image_features,
            text_features,
            logit_scale,
            neg_text_features=neg_text_features,
            group=self.group,
            leave_one_out=leave_one_out,
        )

    def multi_positive(
        self, image_features: Tensor, pos_text_features: Tensor, pos_mask: Tensor,
        logit_scale: Tensor
    ) -> Tensor:
        return gather_multipos_loss(image_features, pos_text_features, pos_mask, logit_scale,
                                    group=self.group)

    def sigmoid(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        return gather_siglip_loss(
            image_features, text_features, logit_scale, logit_bias, group=self.group
        )

    def weighted_softmax(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        *,
        weight_features: Tensor,
        weight: Callable[[Tensor], Tensor],
    ) -> Tensor:
        return gather_weighted_clip_loss(image_features, text_features, logit_scale,
                                         weight_features=weight_features, weight=weight,
                                         group=self.group)


@dataclass(frozen=True)
class RingBackend:
    """Ring-passed column blocks with tiled logits; memory O(b·D + tile_size²) per rank."""

    group: ProcessGroup | None = None
    tile_size: int = DEFAULT_TILE_SIZE
    name: str = "ring"

    def softmax(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        *,
        neg_text_features: Tensor | None = None,
        leave_one_out: bool = False,
    ) -> Tensor:
        return ring_clip_loss(
            image_features,
            text_features,
            logit_scale,
            neg_text_features=neg_text_features,
            group=self.group,
            tile_size=self.tile_size,
            leave_one_out=leave_one_out,
        )

    def multi_positive(
        self, image_features: Tensor, pos_text_features: Tensor, pos_mask: Tensor,
        logit_scale: Tensor
    ) -> Tensor:
        return ring_multipos_loss(image_features, pos_text_features, pos_mask, logit_scale,
                                  group=self.group, tile_size=self.tile_size)

    def sigmoid(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        return ring_siglip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            group=self.group,
            tile_size=self.tile_size,
        )

    def weighted_softmax(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        *,
        weight_features: Tensor,
        weight: Callable[[Tensor], Tensor],
    ) -> Tensor:
        return ring_weighted_clip_loss(image_features, text_features, logit_scale,
                                       weight_features=weight_features, weight=weight,
                                       group=self.group, tile_size=self.tile_size)


def _build_local(group: ProcessGroup | None, tile_size: int) -> ContrastiveBackend:
    world_size = Ring.of(group).size
    if world_size > 1:
        raise ValueError(
            f"loss.backend 'local' sees only this rank's batch, but the world size is "
            f"{world_size}: the loss would not be the global-batch loss. Use 'ring', 'gather' "
            "or 'auto'."
        )
    return LocalBackend()


def _build_gather(group: ProcessGroup | None, tile_size: int) -> ContrastiveBackend:
    return GatherBackend(group=group)


def _build_ring(group: ProcessGroup | None, tile_size: int) -> ContrastiveBackend:
    if tile_size < 1:
        raise ValueError(f"loss.tile_size must be >= 1; got {tile_size}")
    return RingBackend(group=group, tile_size=tile_size)


def _build_auto(group: ProcessGroup | None, tile_size: int) -> ContrastiveBackend:
    if Ring.of(group).size > 1:
        return _build_ring(group, tile_size)
    return LocalBackend()


BACKENDS: dict[str, Callable[[ProcessGroup | None, int], ContrastiveBackend]] = {
    "local": _build_local,
    "gather": _build_gather,
    "ring": _build_ring,
    "auto": _build_auto,
}
"""Backend builders by the name a recipe uses (`loss.backend`)."""


def build_backend(
    name: str, *, group: ProcessGroup | None = None, tile_size: int = DEFAULT_TILE_SIZE
) -> ContrastiveBackend:
    """The contrastive backend called `name` for `group` (default: the default process group).

    Build it after the process group exists: 'auto' reads the world size now, and 'local'
    refuses a world size > 1. `tile_size` is used by the ring backend only.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown contrastive backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name](group, tile_size)
