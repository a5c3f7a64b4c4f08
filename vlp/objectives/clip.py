"""CLIP: symmetric softmax InfoNCE between matched image and text features.

Shapes: b local batch, D embedding dim. `output["image_features"]` (b, D) and
`output["text_features"]` (b, D) are L2-normalised; `output["logit_scale"]` is the exponentiated
learnable temperature (clamped to ≤ 100 by the trainer after each step, as in CLIP).

`denominator` chooses the softmax's denominator:
- `all` (default): InfoNCE, CLIP's loss; every row's positive is in its own denominator.
- `leave_one_out`: per row, −s·x_i·y_i + log Σ_{j≠i} exp(s·x_i·y_j), in both directions and
  halved as CLIP's: the positive is left out of its own denominator. This is the decoupled
  contrastive loss (DCL; Yeh et al., 2022, "Decoupled Contrastive Learning") on CLIP's cross-
  modal pairs, and InfoLOOB (Fürst et al., 2022, CLOOB's leave-one-out bound): one formula.
  DCL's SimCLR form also counts same-view negatives (x_i·x_j), which CLIP's loss never has;
  CLOOB's `infoLOOB_loss` multiplies by τ = 1/s and sums the two directions (so it is this loss
  times 2/s), and CLOOB applies it to Hopfield-retrieved features, which vlp does not ship: vlp
  ships the loss only. It can be negative and is unbounded below, and the positive's gradient
  no longer shrinks as its softmax probability grows (the negative–positive coupling DCL
  removes). tests/unit/test_leave_one_out.py checks it against both papers' code, in float64.
  Every backend (local, gather, ring) computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlp.objectives.registry import register

DENOMINATORS = {"all": False, "leave_one_out": True}
"""`denominator` values → whether the positive is left out of its own softmax denominator."""


def check_denominator(objective: str, denominator: str) -> None:
    if denominator not in DENOMINATORS:
        raise ValueError(f"objective {objective}: denominator must be one of "
                         f"{', '.join(DENOMINATORS)}, got {denominator!r}")


@register("clip")
class ClipObjective(nn.Module):
    @dataclass
    class Config:
        denominator: str = "all"
        """all = InfoNCE (CLIP); leave_one_out = the positive left out (DCL / InfoLOOB)."""

        def __post_init__(self) -> None:
            check_denominator("clip", self.denominator)

    requires: set[str] = set()

    def __init__(self, cfg: Config, *, backend: Any):
        super().__init__()
        self.cfg = cfg
        self.backend = backend

    def forward(self, output: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss = self.backend.softmax(
            output["image_features"],
            output["text_features"],
            output["logit_scale"],
            leave_one_out=DENOMINATORS[self.cfg.denominator],
        )
        return {"clip": loss}
