"""The non-finite guard: no checkpoint ever holds non-finite weights.

A step whose loss or gradient is not finite is skipped (not applied) and counted. But a finite
step can still apply a ruinous update (a learning rate of 1e6): its weights are finite or not,
and the next forward pass then fills the normalisation buffers with NaN. So:

- every save first checks that the weights and buffers are finite, and writes nothing if not
  (`latest` keeps naming the previous checkpoint);
- after `train.max_nonfinite_steps` non-finite steps in a row the run stops without saving:
  the weights it has are the ones that just failed that many times, and `latest` stays the last
  good checkpoint;
- a resumed run starts a fresh streak (its weights come from a saved, finite checkpoint, and it
  usually has a lower learning rate); the total of skipped steps carries on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from vlp.checkpoint import latest_checkpoint


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def check_finite(cfg: Any, state: Any, skipped_step: int) -> None:
    """Count a skipped (non-finite) step in `state`; after `cfg.train.max_nonfinite_steps` in a
    row, stop without saving (`cfg` is the RunConfig, `state` the TrainState)."""
    state.skipped_steps += skipped_step
    state.nonfinite_streak = state.nonfinite_streak + 1 if skipped_step else 0
    if state.nonfinite_streak >= cfg.train.max_nonfinite_steps:
        latest = latest_checkpoint(cfg.output_dir)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved"
        raise NonFiniteLossError(
            f"{state.nonfinite_streak} consecutive steps had a non-finite loss or gradient "
            f"(up to step {state.step}); nothing saved from them, {kept}. "
            "Lower optim.lr, raise optim.warmup_steps, or check the data; then run again "
            "to resume from it.")


def weights_are_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every floating-point tensor is finite (a DTensor: its local shard)."""
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return False
    return True


def finite_to_save(accelerator: Accelerator, model: torch.nn.Module, *, step: int,
                   run_dir: str | Path) -> bool:
    """Whether the checkpoint of `step` may be written: the model's parameters and buffers are
    finite on every rank (a collective: call it on all ranks before saving)."""
    local = weights_are_finite(itertools.chain(model.parameters(), model.buffers()))
    flag = torch.tensor(float(local), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "min")
    if bool(flag):
        return True
    latest = latest_checkpoint(run_dir)
    accelerator.print(f"not saving the checkpoint of step {step}: the weights are not finite; "
                      f"latest stays {latest.name if latest else 'unset (no checkpoint yet)'}")
    return False
