"""Alignment and uniformity on the hypersphere (Wang & Isola, 2020), within and across modalities.

Shapes: b local batch, D embedding dim. x = `output["image_features"]` (b, D) and
y = `output["text_features"]` (b, D), L2-normalised; (x_i, y_i) are matched pairs.

Terms, each returned multiplied by its weight (a zero weight leaves the term out):
- `align` = mean_i ‖x_i − y_i‖^α: matched pairs pull together.
- `uniform_image` = log( mean_{i<j} exp(−t‖x_i − x_j‖²) ), and `uniform_text` the same on y:
  each modality spreads over the sphere. With the default weights ½ each, their sum is the
  L_Uniform of Fahim et al., "It's Not a Modality Gap: Characterizing and Addressing the
  Contrastive Gap" (arXiv 2405.18570).
- `uniform_cross` = log( mean_{i≠j} exp(−t‖x_i − y_j‖²) ): uniformity across modalities over
  the b(b−1) unmatched image–text pairs, the L_XUniform of the same paper (CUAXU = CLIP +
  uniformity + alignment + cross uniformity; CUA leaves it out). Matched pairs are excluded so
  that this term does not fight `align`. The paper's equations could not be read when this was
  written: the formula follows its description (uniformity between image and text embeddings)
  and a public re-implementation over the same i≠j pairs (whose value is ours + log(b−1), a
  constant); another re-implementation also counts the matched pairs i = j.

All terms are local: they see this rank's b pairs only, never the global batch (the log of a
mean over pairs does not decompose over ranks, and no backend is used). Under DDP the gradient
is that of the mean over ranks of each rank's term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlp.objectives.registry import register


def alignment(x: Tensor, y: Tensor, *, alpha: float) -> Tensor:
    """mean_i ‖x_i − y_i‖^α for matched rows of x, y (b, D)."""
    return (x - y).pow(2).sum(dim=1).pow(alpha / 2).mean()


def _log_mean_exp(values: Tensor) -> Tensor:
    return torch.logsumexp(values, dim=0) - math.log(values.numel())


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """‖a_i − b_j‖² (n, m), without the square root whose gradient is undefined at 0."""
    sq = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T
    return sq.clamp_min(0)


def uniformity(x: Tensor, *, t: float) -> Tensor:
    """log mean_{i<j} exp(−t‖x_i − x_j‖²) over the distinct pairs of rows of x (b, D)."""
    rows, cols = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return _log_mean_exp(-t * _squared_distances(x, x)[rows, cols])


def cross_uniformity(x: Tensor, y: Tensor, *, t: float) -> Tensor:
    """log mean_{i≠j} exp(−t‖x_i − y_j‖²) over the unmatched pairs of x, y (b, D)."""
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return _log_mean_exp(-t * _squared_distances(x, y)[off_diagonal])


@register("align_uniform")
class AlignUniformObjective(nn.Module):
    @dataclass
    class Config:
        alpha: float = 2.0
        """Exponent α of the alignment distance ‖x − y‖^α (Wang & Isola: 2)."""
        t: float = 2.0
        """Scale t of the Gaussian potential exp(−t‖a − b‖²) in the uniformity terms (2)."""
        align_weight: float = 1.0
        """Weight of `align`; 0 = left out."""
        uniform_weight: float = 0.5
        """Weight of each of `uniform_image` and `uniform_text` (½ each = their mean); 0 = out."""
        cross_uniform_weight: float = 0.0
        """Weight of `uniform_cross`, the cross-modal uniformity (CUAXU: 1); 0 = left out."""

        def __post_init__(self) -> None:
            for name in ("alpha", "t"):
                if getattr(self, name) <= 0:
                    raise ValueError(
                        f"objective align_uniform: {name} must be > 0, got {getattr(self, name)}"
                    )

    requires: set[str] = set()
    requires_outputs: set[str] = set()

    def __init__(self, cfg: Config, *, backend: Any = None):
        super().__init__()
        self.cfg = cfg

    def forward(self, output: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x, y = output["image_features"], output["text_features"]
        if x.shape[0] < 2:
            raise ValueError(f"align_uniform needs at least 2 pairs per rank, got {x.shape[0]}")
        cfg = self.cfg
        terms: dict[str, Tensor] = {}
        if cfg.align_weight:
            terms["align"] = cfg.align_weight * alignment(x, y, alpha=cfg.alpha)
        if cfg.uniform_weight:
            terms["uniform_image"] = cfg.uniform_weight * uniformity(x, t=cfg.t)
            terms["uniform_text"] = cfg.uniform_weight * uniformity(y, t=cfg.t)
        if cfg.cross_uniform_weight:
            terms["uniform_cross"] = cfg.cross_uniform_weight * cross_uniformity(x, y, t=cfg.t)
        return terms
