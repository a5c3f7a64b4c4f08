"""When a run saves, how every rank takes part, and which checkpoint it resumes from.

Saving: every rank writes its own RNG states into the staging folder and takes part in
gathering the model's full state dict (FSDP needs all ranks for that); the main process writes
the rest, the manifest, renames the folder into place and prunes. Resuming (`resume: auto`):
the main process picks the newest checkpoint whose files match its manifest (the one the
`latest` pointer names, else an older one), warns about each one it passes over and renames it
`step-N.broken`, and every rank loads the chosen one, its own RNG file included. A checkpoint
named explicitly must verify, or the run stops before the first step with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from vlp import checkpoint
from vlp.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # `DualEncoder.model`, the open_clip model a checkpoint holds


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


def is_milestone(cfg: CheckpointConfig, step: int) -> bool:
    """A milestone checkpoint is saved even off the `every` cadence and never pruned."""
    return step in cfg.milestones or (cfg.milestone_every > 0 and step % cfg.milestone_every == 0)


def save_due(cfg: CheckpointConfig, step: int, *, last: bool) -> bool:
    return last or step % cfg.every == 0 or is_milestone(cfg, step)


def save_run_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    cfg: CheckpointConfig,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    model_info: dict[str, Any],
    config_yaml: str,
    files: dict[str, Any],
) -> None:
    """Save the checkpoint of `step`; call on every rank (`model` is the prepared DualEncoder)."""
    accelerator.wait_for_everyone()
    staging = run_dir / (checkpoint.checkpoint_name(step) + ".tmp")
    if accelerator.is_main_process:
        checkpoint.start_checkpoint(run_dir, step)
    accelerator.wait_for_everyone()
    checkpoint.save_rng_state(staging, rank=accelerator.process_index)
    # A collective under FSDP (rank 0 gets the full tensors); a plain state_dict otherwise.
    weights, optim_state = checkpoint.full_state_dicts(model, unwrap_optimizer(optimizer),
                                                       prefix=MODEL_PREFIX)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if accelerator.scaler is not None:
            trainer_state = {**trainer_state, "grad_scaler": accelerator.scaler.state_dict()}
        checkpoint.save_checkpoint(
            run_dir, step=step, model=weights, optimizer=optim_state, trainer_state=trainer_state,
            model_info=model_info, config_yaml=config_yaml, keep_last=cfg.keep_last, files=files,
            milestone=is_milestone(cfg, step), staged=True,
        )
    accelerator.wait_for_everyone()


def choose_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from (main process): verified, else an error or None."""
    if resume == "never":
        return None
    if resume != "auto":
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise ConfigError(f"checkpoint.resume: no checkpoint folder {ckpt}")
        try:
            checkpoint.verify_checkpoint(ckpt)
        except checkpoint.CheckpointError as e:
            raise ConfigError(f"checkpoint.resume={ckpt} does not verify: {e}") from None
        return ckpt
    ckpt, skipped = checkpoint.newest_verified_checkpoint(run_dir)
    if ckpt is None and skipped:
        raise ConfigError(
            f"checkpoint.resume=auto: no checkpoint in {run_dir} verifies: "
            + "; ".join(f"{bad.name}: {err}" for bad, err in skipped)
            + ". Restore one, name one with checkpoint.resume=PATH, or start over in a new "
            "output_dir")
    for bad, err in skipped:
        moved = checkpoint.set_aside(bad)
        log.warning("resume: skipping checkpoint %s (moved to %s): %s", bad.name, moved.name, err)
    return ckpt


def restore_run_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    cfg: CheckpointConfig,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any] | None:
    """Load the checkpoint `cfg.resume` selects into every rank; return its trainer state
    (None = start from scratch). The grad scaler is restored here too when there is one."""
    choice: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            choice = [("ok", choose_checkpoint(run_dir, cfg.resume))]
        except ConfigError as e:
            choice = [("error", str(e))]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    status, value = choice[0]
    if status == "error":
        raise ConfigError(value)
    if value is None:
        return None
    # Verified once by the main process; the other ranks read the same files.
    saved = checkpoint.load_checkpoint(value, model=model, optimizer=unwrap_optimizer(optimizer),
                                       rank=accelerator.process_index, verify=False,
                                       prefix=MODEL_PREFIX)
    if not saved["rng_restored"]:
        log.warning("resume: %s has no RNG state for rank %d (the run has more processes "
                    "now); this rank keeps its seeded RNG", value, accelerator.process_index)
    if accelerator.scaler is not None and "grad_scaler" in saved:
        accelerator.scaler.load_state_dict(saved["grad_scaler"])
    accelerator.print(f"resumed from {value} at step {saved['step']}")
    return saved
