"""SigLIP: pairwise sigmoid loss with a learnable temperature and bias (Zhai et al., 2023).

Shapes: b local batch, B global batch, D embedding dim. `output["image_features"]` (b, D) and
`output["text_features"]` (b, D) are L2-normalised; `output["logit_scale"]` is the exponentiated
temperature t = exp(t') and `output["logit_bias"]` the bias b, both scalar parameters of the
model (the recipe sets `model.init_logit_scale: 2.302585` (log 10) and `model.init_logit_bias:
-10`, the paper's initialisation).

Loss on the global batch: −(1/B) Σ_{i,j} log σ(z_ij (t x_i·y_j + b)), z_ij = +1 on matched pairs
and −1 elsewhere — the sum over all B² pairs divided by the batch size, as in the paper and
open_clip's `SigLipLoss`. Computed by the contrastive backend, so it is the global-batch loss
whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlp.objectives.registry import register


@register("siglip")
class SigLipObjective(nn.Module):
    @dataclass
    class Config:
        pass

    requires: set[str] = set()
    requires_outputs: set[str] = {"logit_bias"}

    def __init__(self, cfg: Config, *, backend: Any):
        super().__init__()
        self.cfg = cfg
        self.backend = backend

    def forward(self, output: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if output.get("logit_bias") is None:
            raise ValueError(
                "objective 'siglip' needs output['logit_bias']: build the model with a logit "
                "bias (model.init_logit_bias: -10 in the recipe)"
            )
        loss = self.backend.sigmoid(
            output["image_features"],
            output["text_features"],
            output["logit_scale"],
            output["logit_bias"],
        )
        return {"siglip": loss}
