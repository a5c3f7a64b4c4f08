"""CLIP: symmetric softmax InfoNCE between matched image and text features.

Shapes: b local batch, D embedding dim. `output["image_features"]` (b, D) and
`output["text_features"]` (b, D) are L2-normalised; `output["logit_scale"]` is the exponentiated
learnable temperature (clamped to ≤ 100 by the trainer after each step, as in CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlp.objectives.registry import register


@register("clip")
class ClipObjective(nn.Module):
    @dataclass
    class Config:
        pass

    requires: set[str] = set()

    def __init__(self, cfg: Config, *, backend: Any):
        super().__init__()
        self.cfg = cfg
        self.backend = backend

    def forward(self, output: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss = self.backend.softmax(
            output["image_features"], output["text_features"], output["logit_scale"]
        )
        return {"clip": loss}
