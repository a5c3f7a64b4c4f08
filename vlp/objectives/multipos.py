"""Multi-positive InfoNCE: CLIP's softmax loss with K true captions per image.

Shapes: b local batch, B global batch, K positives per image, D embedding dim.
`output["image_features"]` (b, D) and `output["pos_text_features"]` (b, K, D) are
L2-normalised (`DualEncoder` encodes the batch's `pos_text` (b, K, L)); `batch["pos_mask"]`
(b, K) bool marks the real positives (False: padding of a sample with fewer captions).

Loss on the global batch (`vlp.distributed.dense_contrastive`): ½ [mean_i −mean_{p∈P(i)}
log softmax(s·x_i·[all real captions])_p + mean over the real captions c of CE(s·y_c·[x_1..x_B],
own image)]: the image→text target mass is spread uniformly over the image's own positives
(the multi-positive / SupCon form), and every caption is a text→image row with its own image as
target. With K = 1 it is the clip loss. Needs `data.captions: all` (K = data.num_positives; the
positives are the `txt` caption and the json's `captions`, e.g. LaCLIP rewrites, DreamLIP sub-
captions, ShapesWorld paraphrases); the recipe check refuses `data.captions` other than all.
Every backend computes it: local, gather and ring (`ring_multipos_loss`: O(b·K·D + tile²)
memory per rank, no (b, B·K) logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlp.objectives.registry import register


@register("multipos")
class MultiPositiveObjective(nn.Module):
    @dataclass
    class Config:
        pass

    requires: set[str] = {"pos_text"}
    requires_outputs: set[str] = set()

    @staticmethod
    def check_recipe(cfg: Config, run: Any) -> None:
        """Raise ValueError (one line) unless `run`'s data gives K positives per image."""
        if run.data.captions != "all":
            raise ValueError("objective multipos needs several positive captions per image "
                             "(batch field pos_text): set data.captions: all and "
                             "data.num_positives")

    def __init__(self, cfg: Config, *, backend: Any):
        super().__init__()
        self.cfg = cfg
        self.backend = backend

    def forward(self, output: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if output.get("pos_text_features") is None or "pos_mask" not in batch:
            raise ValueError(
                "objective 'multipos' needs output['pos_text_features'] and batch['pos_mask']: "
                "set data.captions: all and data.num_positives, and pass pos_text to the model")
        features = output["image_features"]
        loss = self.backend.multi_positive(
            features, output["pos_text_features"], batch["pos_mask"].to(features.device),
            output["logit_scale"])
        return {"multipos": loss}
