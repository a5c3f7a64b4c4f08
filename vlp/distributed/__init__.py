"""Contrastive backends (local | gather | ring) that see the global batch across ranks.

See `backends.py` for the interface the objectives call and `ring_contrastive.py` for the
tiled, ring-based losses and their gradient semantics.
"""

from vlp.distributed.backends import (
    BACKENDS,
    ContrastiveBackend,
    GatherBackend,
    LocalBackend,
    RingBackend,
    build_backend,
)
from vlp.distributed.collectives import Ring
from vlp.distributed.dense_contrastive import (
    gather_clip_loss,
    gather_siglip_loss,
    local_clip_loss,
    local_siglip_loss,
)
from vlp.distributed.ring_contrastive import (
    DEFAULT_TILE_SIZE,
    ring_clip_loss,
    ring_multipos_loss,
    ring_siglip_loss,
    ring_weighted_clip_loss,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_TILE_SIZE",
    "ContrastiveBackend",
    "GatherBackend",
    "LocalBackend",
    "Ring",
    "RingBackend",
    "build_backend",
    "gather_clip_loss",
    "gather_siglip_loss",
    "local_clip_loss",
    "local_siglip_loss",
    "ring_clip_loss",
    "ring_multipos_loss",
    "ring_siglip_loss",
    "ring_weighted_clip_loss",
]
