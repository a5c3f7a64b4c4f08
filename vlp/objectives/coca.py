"""CoCa: a contrastive term plus an autoregressive captioning term (Yu et al., 2022).

Shapes: b local batch, D embedding dim, L context length, V vocabulary size.
`output["image_features"]`, `output["text_features"]` (b, D), L2-normalised;
`output["logit_scale"]` (exp applied); `output["logits"]` (b, L−1, V), the caption decoder's
next-token logits for positions 0..L−2; `output["labels"]` (b, L−1), the caption tokens 1..L−1
(open_clip's `CoCa.forward` shifts `text` by one). Padding (`pad_id`, 0 for open_clip's
tokenizer) is ignored by the caption loss; the end-of-text token is not.

Terms, already multiplied by their weights (as open_clip's `CoCaLoss` returns them):
- `coca_contrastive` = contrastive_weight · CLIP softmax loss, through the contrastive backend
  (global batch);
- `coca_caption` = caption_weight · mean over the non-pad label tokens of this rank's batch of
  the cross-entropy of the next token. It is local: under DDP each rank's mean is averaged, as
  in open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp.objectives.registry import register


@register("coca")
class CocaObjective(nn.Module):
    @dataclass
    class Config:
        contrastive_weight: float = 1.0
        """Weight of the contrastive term (open_clip's `--coca-contrastive-loss-weight`); 0 = off."""
        caption_weight: float = 2.0
        """Weight of the captioning term (open_clip's `--coca-caption-loss-weight`)."""
        pad_id: int = 0
        """Label id that the caption loss ignores: the tokenizer's padding (0 for open_clip's)."""

    requires: set[str] = set()
    requires_outputs: set[str] = {"logits"}

    def __init__(self, cfg: Config, *, backend: Any):
        super().__init__()
        self.cfg = cfg
        self.backend = backend

    def forward(self, output: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if output.get("logits") is None or output.get("labels") is None:
            raise ValueError(
                "objective 'coca' needs output['logits'] and output['labels'] from a captioning "
                "(CoCa) model, e.g. model.name: vlp-tiny-coca or coca_ViT-B-32"
            )
        logits, labels = output["logits"], output["labels"]  # (b, L-1, V), (b, L-1)
        if self.cfg.contrastive_weight:
            contrastive = self.cfg.contrastive_weight * self.backend.softmax(
                output["image_features"], output["text_features"], output["logit_scale"]
            )
        else:
            contrastive = logits.new_zeros(())
        # Same mean over non-pad tokens as open_clip's (b, V, L-1) layout; ~2x faster on CPU.
        caption = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                  ignore_index=self.cfg.pad_id)
        return {"coca_contrastive": contrastive, "coca_caption": self.cfg.caption_weight * caption}
