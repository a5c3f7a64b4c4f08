"""The non-finite guard: no checkpoint holds weights that are not finite, or that have just
failed; `latest` is left at the last good checkpoint.

A step whose loss or gradient is not finite is skipped (not applied) and counted. But a finite
step can still apply a ruinous update (a learning rate of 1e6): its weights may be finite, and
only the next step's loss shows the damage (and fills the normalisation buffers). A checkpoint of
step k holds the weights that step k+1 computes its loss with, so:

- a save writes nothing when the weights or buffers are not finite, or while non-finite steps
  are in a row (the weights have just failed); `latest` keeps naming the previous checkpoint,
  and pruning never deletes a good one for a bad one;
- after `train.max_nonfinite_steps` in a row the run stops without saving; the checkpoint of the
  step just before the first bad one (its weights produced it) is renamed `step-N.nonfinite`
  and `latest` names the one before, the last good checkpoint (with `checkpoint.keep_last=1`
  the suspect checkpoint has already pruned it: no good one is left);
- a resumed run starts a fresh streak (its weights come from a good checkpoint, and it usually
  has a lower learning rate; `vlp.train.optim.apply_optim_settings`); the total of skipped
  steps carries on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from vlp.checkpoint import LATEST, checkpoint_name, checkpoint_step, list_checkpoints
from vlp.train.run_lock import is_main_rank

SET_ASIDE_SUFFIX = ".nonfinite"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def check_finite(cfg: Any, state: Any, skipped_step: int) -> None:
    """Count a skipped (non-finite) step in `state`; after `cfg.train.max_nonfinite_steps` in a
    row, set the failed checkpoint aside and stop (`cfg`: the RunConfig, `state`: TrainState)."""
    state.skipped_steps += skipped_step
    state.nonfinite_streak = state.nonfinite_streak + 1 if skipped_step else 0
    if state.nonfinite_streak < cfg.train.max_nonfinite_steps:
        return
    first_bad = state.step - state.nonfinite_streak + 1
    run_dir = Path(cfg.output_dir)
    kept = f"{run_dir / LATEST} names the last good checkpoint"
    if is_main_rank():
        good, set_aside = fall_back_before(run_dir, first_bad)
        kept = f"the last good checkpoint is {good}" if good else "no good checkpoint is left"
        if set_aside is not None:
            kept += f" ({set_aside.name}: its weights gave step {first_bad})"
    steps = f"step {first_bad}" if first_bad == state.step else f"steps {first_bad}-{state.step}"
    raise NonFiniteLossError(
        f"{state.nonfinite_streak} consecutive steps had a non-finite loss or gradient "
        f"({steps}); nothing saved from them, {kept}. Lower optim.lr, raise "
        "optim.warmup_steps, or check the data; then run again to resume from it.")


def fall_back_before(run_dir: Path, first_bad: int) -> tuple[Path | None, Path | None]:
    """Set aside the checkpoint of step `first_bad - 1` (its weights produced the first bad
    step) and point `latest` at the newest checkpoint before it (main process). Return that
    checkpoint and where the failed one went (None: none, or nothing was set aside)."""
    failed, set_aside = run_dir / checkpoint_name(first_bad - 1), None
    if failed.is_dir():
        set_aside = failed.with_name(failed.name + SET_ASIDE_SUFFIX)
        n = 1
        while set_aside.exists():
            n += 1
            set_aside = failed.with_name(f"{failed.name}{SET_ASIDE_SUFFIX}{n}")
        os.replace(failed, set_aside)
    earlier = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) < first_bad - 1]
    pointer = run_dir / LATEST
    if not earlier:
        pointer.unlink(missing_ok=True)
        return None, set_aside
    tmp = pointer.with_name(LATEST + ".tmp")
    tmp.write_text(earlier[-1].name + "\n")
    os.replace(tmp, pointer)
    return earlier[-1], set_aside


def weights_are_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every floating-point tensor is finite (a DTensor: its local shard)."""
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return False
    return True


def good_to_save(accelerator: Accelerator, model: torch.nn.Module, state: Any, *,
                 run_dir: str | Path) -> bool:
    """Whether the checkpoint of `state.step` may be written: the last step was finite and what
    the checkpoint would hold of the model (its state dict: parameters and persistent buffers,
    not e.g. a causal mask of -inf) is finite, on every rank (a collective: call it on all
    ranks before saving)."""
    in_streak = state.nonfinite_streak > 0
    local = not in_streak and weights_are_finite(model.state_dict(keep_vars=True).values())
    flag = torch.tensor(float(local), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "min")
    if bool(flag):
        return True
    why = "the last step was not finite" if in_streak else "the weights are not finite"
    pointer = Path(run_dir) / LATEST
    latest = pointer.read_text().strip() if pointer.is_file() else "unset (no checkpoint yet)"
    accelerator.print(f"not saving the checkpoint of step {state.step}: {why}; latest stays "
                      f"{latest}")
    return False
