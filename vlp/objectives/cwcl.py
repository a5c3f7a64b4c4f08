"""CWCL: contrastive loss with continuously weighted targets from a locked tower (Srinivasa et
al., 2023, "CWCL: Cross-Modal Transfer with Continuously Weighted Contrastive Loss").

Shapes: b local batch, B global batch, D embedding dim. `output["image_features"]` and
`output["text_features"]` (b, D) are L2-normalised; `output["logit_scale"]` is s = 1/τ.

In LiT-style training one tower is locked (pretrained, frozen). CLIP's loss treats every
unmatched pair as equally negative; CWCL instead gives each pair a target weight from the locked
modality's own similarity of the two samples, so "a red circle" and "a red square" are not pushed
as far apart as "a red circle" and "a blue triangle". With q the locked modality's features
(`weights_from`, default text) and p the other's, the loss on the global batch is

    w_ij = weight(q_i·q_j)        (q L2-normalised and detached: no gradient through w)
    L_{p→q} = −1/B Σ_i Σ_j w_ij log softmax_j(s·p_i·q_j) / Σ_j w_ij
    L_{q→p} = −1/B Σ_i Σ_j w_ij log softmax_j(s·q_i·p_j) / Σ_j w_ij
    loss    = (L_{p→q} + L_{q→p}) / 2

`weight` (the `weighting` option; `weight` is every objective's own loss weight):
- `shifted_cosine` (default): w_ij = (1 + cos(q_i, q_j)) / 2 ∈ [0, 1], w_ii = 1: the paper's
  form (as recalled: its weights are the locked modality's inner products, mapped to [0, 1]).
- `clamped_cosine`: w_ij = max(cos(q_i, q_j), 0), w_ii = 1: only pairs the locked tower finds
  alike get weight (a vlp option, not the paper's); with mutually orthogonal q it is the
  identity, and the loss is CLIP's.

What was implemented and why (written from memory of the paper; its text could not be
consulted): the paper defines the cross-modal term L_{U→V} from the trainable modality U to
the locked modality V with the per-anchor normalisation 1/Σ_j w_ij, weights taken from V's
intra-modal similarities, and uses the other direction likewise. Here both directions use the
same w (w is symmetric, so row i of either direction is weighted by the locked modality's
similarity of samples i and j), and they are halved as CLIP's loss is, so that w = identity
gives exactly vlp's `clip` loss (checked in tests/unit/test_cwcl.py).

The weights are computed from the normalised features the loss already receives, detached. They
are the locked tower's own embeddings only when nothing trainable sits between the locked tower
and the loss, so the recipe check (`check_recipe`) refuses, with one line, a `weights_from`
modality that is not fully locked, and a transformers text tower with a trainable projection
(`model.hf_text_proj` other than none): the weights would then move with training. Backends:
all three (`weighted_softmax`); on ring, one pass over the column blocks, which carry their
weight features so that each tile's weights are formed there, gives both directions'
log-sum-exps, target sums and normalisers (`ring_weighted_clip_loss`, docs/design.md §4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlp.objectives.registry import register


def shifted_cosine(cosine: Tensor) -> Tensor:
    """(1 + cos) / 2: the paper's weights, in [0, 1]."""
    return (1 + cosine) / 2


def clamped_cosine(cosine: Tensor) -> Tensor:
    """max(cos, 0): dissimilar pairs get no weight."""
    return cosine.clamp_min(0)


WEIGHTS: dict[str, Callable[[Tensor], Tensor]] = {
    "shifted_cosine": shifted_cosine,
    "clamped_cosine": clamped_cosine,
}
"""`weighting` values → the map from the locked modality's cosine similarity to a target weight."""


def _text_locked(model: Any) -> str | None:
    """Why the text features are not the locked text tower's own outputs (None: they are)."""
    if not model.lock_text or model.lock_text_unlocked_layers:
        return "needs a fully locked text tower: set model.lock_text: true (and no unlocked layers)"
    if model.hf_text_model is not None and model.hf_text_proj != "none":
        return (f"takes its weights from the text features, but model.hf_text_proj "
                f"{model.hf_text_proj!r} is trainable: set model.hf_text_proj: none")
    return None


def _image_locked(model: Any) -> str | None:
    """Why the image features are not the locked image tower's own outputs (None: they are)."""
    if not model.lock_image or model.lock_image_unlocked_groups:
        return ("needs a fully locked image tower: set model.lock_image: true (and no unlocked "
                "groups)")
    return None


LOCKED = {"text": _text_locked, "image": _image_locked}
"""`weights_from` values → the check that the model config locks that modality's tower."""


@register("cwcl")
class CwclObjective(nn.Module):
    @dataclass
    class Config:
        weights_from: str = "text"
        """The locked modality whose intra-modal similarities give the targets: text | image."""
        weighting: str = "shifted_cosine"
        """shifted_cosine = (1 + cos) / 2 (the paper) | clamped_cosine = max(cos, 0)."""

        def __post_init__(self) -> None:
            if self.weights_from not in LOCKED:
                raise ValueError(f"objective cwcl: weights_from must be one of "
                                 f"{', '.join(LOCKED)}, got {self.weights_from!r}")
            if self.weighting not in WEIGHTS:
                raise ValueError(f"objective cwcl: weighting must be one of "
                                 f"{', '.join(WEIGHTS)}, got {self.weighting!r}")

    requires: set[str] = set()
    requires_outputs: set[str] = set()

    @staticmethod
    def check_recipe(cfg: Config, run: Any) -> None:
        """Raise ValueError (one line) unless `run`'s model locks the `weights_from` tower."""
        problem = LOCKED[cfg.weights_from](run.model)
        if problem is not None:
            raise ValueError(f"objective cwcl (weights_from: {cfg.weights_from}) {problem}")

    def __init__(self, cfg: Config, *, backend: Any):
        super().__init__()
        self.cfg = cfg
        self.backend = backend

    def forward(self, output: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss = self.backend.weighted_softmax(
            output["image_features"],
            output["text_features"],
            output["logit_scale"],
            weight_features=output[f"{self.cfg.weights_from}_features"],
            weight=WEIGHTS[self.cfg.weighting],
        )
        return {"cwcl": loss}
