"""The training loop: accelerate for devices, DDP and mixed precision; read it top to bottom.

`train(cfg)` checks the config against the registries, builds the run (`Trainer`), restores the
latest checkpoint when asked, then runs steps until `train.steps`, logging, checkpointing and
evaluating on the way, and finally runs the end-of-run evaluation and writes the run report.
Host syncs: one per step (whether the update was finite), the rest only on log steps (metrics;
every diagnostic step, `train.diagnostics_every`, is one), on stop checks (every
`STOP_CHECK_EVERY` steps) and on checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from vlp.config import RunConfig
from vlp.train.checkpointing import save_due
from vlp.train.checks import check_config
from vlp.train.nonfinite import NonFiniteLossError, check_finite
from vlp.train.report import end_summary, start_banner, write_run_report
from vlp.train.run_lock import RunLock
from vlp.train.signals import StopRequest
from vlp.train.trainer import Trainer, TrainState

__all__ = ["NonFiniteLossError", "RunResult", "TrainState", "check_finite", "train"]

STOP_CHECK_EVERY = 10
"""Steps between checks for a stop signal when ranks must agree on it (an all-reduce); log and
checkpoint steps check too, and a single process checks after every step."""


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    last_metrics: dict[str, float]
    report: Path | None
    stopped_by_signal: int | None = None


def train(cfg: RunConfig) -> RunResult:
    check_config(cfg)  # what the config alone cannot know: registries, model, weights files
    with RunLock(cfg.output_dir):  # one run per output_dir (vlp.train.run_lock)
        return run(cfg)


def run(cfg: RunConfig) -> RunResult:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    trainer.restore()
    accelerator, state, suites = trainer.accelerator, trainer.state, trainer.suites
    accelerator.print(start_banner(trainer))
    progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    metrics: dict[str, float] = {}
    stop, stopping, saved = StopRequest(announce=accelerator.is_main_process).install(), False, False
    try:
        while state.step < cfg.train.steps and not stopping:
            result = trainer.step()
            check_finite(cfg, state, int(result.failed))  # raises after too many in a row
            progress.update(1)
            last = state.step == cfg.train.steps
            logging = (state.step % cfg.train.log_every == 0 or last
                       or result.diagnostics is not None)  # a diagnostic step logs them
            if logging:
                metrics = trainer.log(result)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            saving = save_due(cfg.checkpoint, state.step, last=last)
            if (logging or saving or state.step % STOP_CHECK_EVERY == 0
                    or accelerator.num_processes == 1):  # alone, a check costs nothing
                stopping = stop.requested(accelerator)
            if stopping or saving:
                saved = trainer.save()
            if suites.periodic is not None and eval_due(cfg, state.step) and not last:
                trainer.evaluate(suites.periodic)
    finally:
        trainer.close_data()
        stop.uninstall()
        progress.close()
    if state.step < cfg.train.steps:
        where = f"checkpoint saved in {run_dir}" if saved else "no checkpoint saved"
        accelerator.print(f"stopped by signal at step {state.step}; {where}")
        accelerator.end_training()
        return RunResult(run_dir, state.step, metrics, None, stopped_by_signal=stop.signum or 0)

    final = trainer.evaluate(suites.final) if suites.final is not None else None
    report = write_run_report(run_dir, final) if accelerator.is_main_process else None
    accelerator.print(end_summary(trainer, seconds=time.perf_counter() - started, report=report))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group: last
    return RunResult(run_dir, state.step, metrics, report)


def eval_due(cfg: RunConfig, step: int) -> bool:
    return cfg.eval.every > 0 and step % cfg.eval.every == 0
