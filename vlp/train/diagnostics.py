"""Training diagnostics: the geometry of the features a step already computed.

Every `train.diagnostics_every` steps the step hands the model output of its **last
micro-batch on this rank** (detached: image and text features, `logit_scale`, `logit_bias`,
`neg_text_features`) to `step_diagnostics`, which computes on the device, without a host sync:

- `diag/pos_cosine`, `diag/neg_cosine`: mean x_i·y_i and mean x_i·y_j (i ≠ j);
- `diag/gap` ‖mean x − mean y‖, `diag/alignment` E‖x_i − y_i‖², `diag/uniformity_image` and
  `diag/uniformity_text` (log E exp(−2‖u − v‖²)), from `vlp.eval.gap.pair_statistics`;
- `diag/temperature` 1 / exp(t), and `diag/logit_bias` when the model has one (SigLIP);
- `diag/hard_neg_above_pos`, with hard-negative captions (NegCLIP): the share of (image, hard
  negative) scores above that image's positive score;
- the histograms `diag/pos_similarity` (x_i·y_i) and `diag/neg_similarity` (x_i·y_j, i ≠ j, at
  most `MAX_HISTOGRAM_VALUES` of them, evenly strided).

Nothing here runs on other steps. The trainer reads the scalars off the device with the step's
other metrics (`Trainer.log`); the scalars reach every tracker (metrics.jsonl included) and the
histograms go to TensorBoard. On more than one rank, rank 0's micro-batch is what is logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vlp.eval.gap import pair_statistics

PREFIX = "diag/"
MAX_HISTOGRAM_VALUES = 65_536
"""Negative similarities kept for the histogram (a b-row batch has b(b − 1))."""

_RENAMED = {"matched_cosine": "pos_cosine", "mean_negative_similarity": "neg_cosine"}


@dataclass
class Diagnostics:
    """One diagnostic step's results, on the device."""

    scalars: dict[str, Tensor]
    """0-dim tensors keyed `diag/...`."""
    histograms: dict[str, Tensor] = field(default_factory=dict)
    """1-dim tensors of values keyed `diag/...`."""


def diagnostics_due(every: int, step: int) -> bool:
    """Whether optimizer step `step` (counted from 1) computes diagnostics."""
    return every > 0 and step % every == 0


@torch.no_grad()
def step_diagnostics(output: dict[str, Any]) -> Diagnostics:
    """The diagnostics (module docstring) of one micro-batch's model output; none for a
    micro-batch of one row (no pairs to compare)."""
    x = output["image_features"].detach().float()
    y = output["text_features"].detach().float()
    if len(x) < 2:
        return Diagnostics({})
    stats = pair_statistics(x, y)
    scalars = {PREFIX + _RENAMED.get(name, name): value for name, value in stats.items()}
    scalars[PREFIX + "temperature"] = 1.0 / output["logit_scale"].detach().float().reshape(())
    if output.get("logit_bias") is not None:
        scalars[PREFIX + "logit_bias"] = output["logit_bias"].detach().float().reshape(())
    positive = (x * y).sum(-1)
    if output.get("neg_text_features") is not None:
        hard = torch.einsum("bd,bkd->bk", x, output["neg_text_features"].detach().float())
        scalars[PREFIX + "hard_neg_above_pos"] = (hard > positive[:, None]).float().mean()
    n = len(x)  # off-diagonal entries without a boolean mask (which would sync the host):
    negative = (x @ y.T).flatten()[1:].view(n - 1, n + 1)[:, :-1].flatten()
    negative = negative[::max(1, -(-len(negative) // MAX_HISTOGRAM_VALUES))]
    histograms = {PREFIX + "pos_similarity": positive, PREFIX + "neg_similarity": negative}
    return Diagnostics(scalars, histograms)


def log_histograms(accelerator: Any, histograms: dict[str, Tensor], *, step: int) -> None:
    """Write `histograms` to the TensorBoard tracker, if the run has one (main process)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for name, values in histograms.items():
                tracker.writer.add_histogram(name, values.float().cpu(), global_step=step)
