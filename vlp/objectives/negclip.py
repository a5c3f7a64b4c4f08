"""NegCLIP: CLIP with hard-negative captions as extra image→text columns (Yuksekgonul et al., 2023).

Shapes: b local batch, B global batch, K hard negatives per image, D embedding dim.
`output["image_features"]`, `output["text_features"]` (b, D) and `output["neg_text_features"]`
(b, K, D) are L2-normalised (`DualEncoder` encodes the batch's `neg_text` (b, K, L)).

Loss on the global batch: ½ [mean_i CE(s·x_i·[y_1..y_B, n_1..n_{B·K}], i)
+ mean_j CE(s·y_j·[x_1..x_B], j)]: every negative caption is a column for every image, and never
a row of the text→image direction (a negative caption has no matching image). Through the
contrastive backend, so it is the global-batch loss whatever the number of processes.

`denominator: leave_one_out` (see `vlp.objectives.clip`) leaves each positive out of its own
denominator; the hard negatives stay in it.

NegCLIP also adds hard-negative *images* (nearest-neighbour images with their own captions) to
the batch; that is a data-side change and is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlp.objectives.clip import DENOMINATORS, check_denominator
from vlp.objectives.registry import register


@register("negclip")
class NegClipObjective(nn.Module):
    @dataclass
    class Config:
        denominator: str = "all"
        """all = InfoNCE (NegCLIP); leave_one_out = the positive left out (DCL / InfoLOOB)."""

        def __post_init__(self) -> None:
            check_denominator("negclip", self.denominator)

    requires: set[str] = {"neg_text"}
    requires_outputs: set[str] = set()

    def __init__(self, cfg: Config, *, backend: Any):
        super().__init__()
        self.cfg = cfg
        self.backend = backend

    def forward(self, output: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if output.get("neg_text_features") is None:
            raise ValueError(
                "objective 'negclip' needs output['neg_text_features']: give the batch hard-"
                "negative captions (data.num_negatives > 0) and pass them to the model"
            )
        loss = self.backend.softmax(
            output["image_features"],
            output["text_features"],
            output["logit_scale"],
            neg_text_features=output["neg_text_features"],
            leave_one_out=DENOMINATORS[self.cfg.denominator],
        )
        return {"negclip": loss}
