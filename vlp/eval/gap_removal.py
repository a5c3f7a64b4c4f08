"""Post-hoc modality-gap removal (GR-CLIP: Li et al., "Closing the Modality Gap for Mixed
Modality Search", 2025).

Each modality's embeddings are centred by that modality's mean over a reference set, then
L2-normalised again: x ↦ (x − μ_image) / ‖x − μ_image‖, y ↦ (y − μ_text) / ‖y − μ_text‖. After
it the reference set's gap ‖mean x − mean y‖ is 0 up to the re-normalisation (exactly 0 before
it), and both modalities share one centre, which is what lets image and text scores be ranked
together. It is off by default: the zero-shot and retrieval tasks take `gap_removal: true` and
then report every metric twice, as is and with the gap removed (`<metric>_gap_removed`), using
the benchmark's own images and texts (class prompts, or captions) as the reference set.
`vlp export --gap-reference ROOT` stores the means of a reference benchmark beside the weights
(`GAP_MEANS_FILE`), so that applications can apply the same centring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SUFFIX = "_gap_removed"
GAP_MEANS_FILE = "modality_means.json"


@dataclass(frozen=True)
class ModalityMeans:
    """The mean image and mean text embedding (D,) of a reference set."""

    image: Tensor
    text: Tensor

    @classmethod
    def of(cls, image_features: Tensor, text_features: Tensor) -> ModalityMeans:
        """The means of a reference set's image (N, D) and text (M, D) embeddings."""
        return cls(image_features.double().mean(0), text_features.double().mean(0))

    def centre_images(self, features: Tensor) -> Tensor:
        return _centred(features, self.image)

    def centre_texts(self, features: Tensor) -> Tensor:
        return _centred(features, self.text)

    @property
    def gap(self) -> float:
        """‖μ_image − μ_text‖: the reference set's modality gap before removal."""
        return (self.image - self.text).norm().item()

    def save(self, path: str | Path, *, reference: str) -> Path:
        """Write the means (and what they were computed on) as JSON."""
        payload = {"reference": reference, "image_mean": self.image.tolist(),
                   "text_mean": self.text.tolist(),
                   "usage": "x -> normalize(x - image_mean), y -> normalize(y - text_mean)"}
        Path(path).write_text(json.dumps(payload) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ModalityMeans:
        payload = json.loads(Path(path).read_text())
        return cls(torch.tensor(payload["image_mean"], dtype=torch.float64),
                   torch.tensor(payload["text_mean"], dtype=torch.float64))


def _centred(features: Tensor, mean: Tensor) -> Tensor:
    return F.normalize(features.double() - mean, dim=-1).to(features.dtype)


def side_by_side(metrics: dict[str, float], removed: dict[str, float], means: ModalityMeans,
                 *, headline: str) -> tuple[dict[str, float], str]:
    """`metrics` as is, `removed` (the same metrics with the gap removed) suffixed `SUFFIX`,
    and `gap_removal_reference_gap`; with a note comparing the headline metric."""
    headline = headline if headline in metrics else next(iter(metrics))
    combined = {**metrics, **{k + SUFFIX: v for k, v in removed.items()},
                "gap_removal_reference_gap": means.gap}
    note = (f"gap removal (GR-CLIP: each modality centred by its mean over this benchmark's "
            f"images and texts, then re-normalised; reference gap {means.gap:.3f}): "
            f"{headline} {metrics[headline]:.4f} as is, {removed[headline]:.4f} with the gap "
            f"removed; every `*{SUFFIX}` metric is its counterpart with the gap removed")
    return combined, note
