"""One optimizer step: gradients from `train.grad_accum` micro-batches, then one update.

Two ways to get the gradients (plain accumulation, or the gradient cache of
`vlp.train.grad_cache`), one way to apply them (`apply_update`), shared by both:

- fp16 (a grad scaler): `optimizer.step()` always runs; accelerate's optimizer calls
  `scaler.step`, which skips the update when the (unscaled) gradients hold an inf or NaN, then
  `scaler.update`, which backs the scale off. Clipping unscales first, exactly once per step.
- fp32 and bf16 (no scaler): the update is skipped here when the loss, summed over every
  micro-batch, or the gradient norm is not finite, so that one bad micro-batch is never applied.

Either way the step costs one host sync, the update decision (the grad scaler makes the same
one). Loss terms and the gradient norm stay on the device: `StepResult` holds tensors, and only
a log step turns them into numbers (`vlp.train.trainer.Trainer.log`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vlp.train.diagnostics import Diagnostics
from vlp.train.fsdp import average_replicated_grads
from vlp.train.grad_cache import cached_backward, forward

MAX_LOGIT_SCALE = math.log(100.0)
"""The temperature is clamped to exp(t) <= 100 after each update (CLIP)."""

Batch = dict[str, Any]
Observer = Callable[[dict[str, Any]], None]
"""Called with the model output of a step's last micro-batch (diagnostic steps only)."""


@dataclass
class StepResult:
    """What one optimizer step did on this rank."""

    terms: dict[str, Tensor]
    """Each loss term (`loss` is the weighted total), mean over the micro-batches, on the device."""
    grad_norm: Tensor
    """The global gradient norm before clipping, on the device."""
    skipped: bool
    """The update was not applied (a non-finite loss or gradient, or an fp16 overflow)."""
    failed: bool
    """Skipped because the loss or gradient was not finite. Under fp16 an overflow with a finite
    loss is the grad scaler calibrating its scale, which is not a failure: the non-finite guard
    (`vlp.train.nonfinite`) counts failed steps only."""
    samples: int
    """Rows this rank trained on in this step."""
    skipped_samples: int
    """This rank's running count of corrupt samples its data streams skipped."""
    diagnostics: Diagnostics | None = None
    """On a diagnostic step, the diagnostics of this rank's last micro-batch (on the device)."""


def accumulated_backward(accelerator: Accelerator, model: nn.Module, objective: nn.Module,
                         micro_batches: Iterator[Batch], *, num_micro_batches: int,
                         observe: Observer | None = None) -> dict[str, Tensor]:
    """Plain accumulation: one backward per micro-batch (DDP reduces on the last one only,
    accelerate divides each loss by the number of micro-batches). Returns the mean terms;
    `observe` gets the last micro-batch's model output."""
    terms_sum: dict[str, Tensor] = {}
    for i, batch in enumerate(micro_batches):
        with accelerator.accumulate(model):
            output = forward(model, batch, accelerator.device)
            terms = objective(output, batch)
            accelerator.backward(terms["loss"])
        if observe is not None and i == num_micro_batches - 1:
            observe(output)
        for name, value in terms.items():
            value = value.detach() / num_micro_batches
            terms_sum[name] = terms_sum[name] + value if name in terms_sum else value
    return terms_sum


def cached_step_backward(accelerator: Accelerator, model: nn.Module, objective: nn.Module,
                         micro_batches: list[Batch], observe: Observer | None = None
                         ) -> dict[str, Tensor]:
    """The gradient cache: all micro-batches form one contrastive batch (`train.grad_cache`);
    `observe` gets the last micro-batch's model output (of the first, no-grad forward).

    The accelerator must not rescale the loss for accumulation (`gradient_accumulation_steps=1`):
    the cached gradients are already the mean.
    """
    if accelerator.gradient_accumulation_steps != 1:
        raise RuntimeError("the gradient cache needs an Accelerator with "
                           "gradient_accumulation_steps=1")
    return cached_backward(model, objective, micro_batches, device=accelerator.device,
                           backward=accelerator.backward,
                           no_sync=lambda: accelerator.no_sync(model), observe=observe)


def apply_update(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                 *, loss: Tensor, grad_clip: float) -> tuple[Tensor, bool]:
    """Clip, step and zero the gradients, skipping a non-finite update (see the module's
    docstring). Returns the gradient norm before clipping and whether the update was skipped."""
    if not accelerator.sync_gradients:
        raise RuntimeError("apply_update after a micro-batch that did not synchronise gradients")
    if accelerator.is_fsdp2:  # the 0-dim parameters FSDP2 leaves out (vlp.train.fsdp)
        average_replicated_grads(model, accelerator)
    # Clipping with an infinite bound only measures; under fp16 it unscales the gradients first.
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    if accelerator.scaler is not None:
        optimizer.step()  # scaler.step skips an overflowing update; scaler.update backs off
        skipped = bool(optimizer.step_was_skipped)
    else:
        skipped = not bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if not skipped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach(), skipped


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep exp(logit_scale) in [1, 100] (on the device, no sync)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
