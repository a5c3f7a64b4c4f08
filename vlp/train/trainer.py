"""The run object: one `Trainer` owns what a training run is made of and does its steps.

It holds the accelerator, the model bundle (model, transforms, tokenizer, spec), the objective,
the optimizer and scheduler, the data stream and the `TrainState`, each built once from its own
slice of the config, and offers `restore()`, `step()`, `log()`, `save()` and `evaluate()`;
`vlp.train.loop.train` decides when each runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vlp.config import RunConfig, dump_config
from vlp.distributed import build_backend
from vlp.eval.runner import SuiteResult, evaluate_suite
from vlp.eval.suite import Suite
from vlp.models import DualEncoder, ModelBundle, build_model, create_model
from vlp.objectives import build_objectives
from vlp.train.build import build_accelerator, build_eval_suites, resolve_data
from vlp.train.checkpointing import restore_run_checkpoint, save_run_checkpoint
from vlp.train.data_stream import build_batches, gather_data_position, rank_data_position
from vlp.train.diagnostics import Diagnostics, diagnostics_due, log_histograms, step_diagnostics
from vlp.train.fsdp import shard_model
from vlp.train.nonfinite import good_to_save
from vlp.train.optim import apply_optim_settings, build_optimizer, build_scheduler
from vlp.train.step import (
    Batch,
    StepResult,
    accumulated_backward,
    apply_update,
    cached_step_backward,
    clamp_logit_scale,
)


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    nonfinite_streak: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    """This rank's data stream positions (`DataPosition.state_dict()`); a checkpoint holds
    every rank's (`vlp.train.data_stream`)."""


class Trainer:
    """A training run: `restore()` once, then `step()` until done; see the module docstring."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.accelerator = build_accelerator(cfg, run_dir)
        set_seed(cfg.train.seed)
        self.config_yaml = dump_config(cfg)
        if self.accelerator.is_main_process:
            (run_dir / "config.yaml").write_text(self.config_yaml)
        self.data = resolve_data(cfg, self.accelerator)
        self.suites = build_eval_suites(cfg.eval, self.data, self.accelerator)
        self.bundle = build_model(cfg.model)
        if not cfg.loss.temperature.learned:  # set by the schedule, never by the optimizer
            self.bundle.model.logit_scale.requires_grad_(False)
        backend = build_backend(cfg.loss.backend, tile_size=cfg.loss.tile_size)
        self.objective = build_objectives(cfg.objectives, backend=backend)
        model = DualEncoder(self.bundle.model)
        if self.accelerator.is_fsdp2:  # before the optimizer sees the parameters
            shard_model(model, self.accelerator)
        optimizer = build_optimizer(self.bundle.model, cfg.optim)
        self.scheduler = build_scheduler(optimizer, warmup_steps=cfg.optim.warmup_steps,
                                         total_steps=cfg.train.steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.state = TrainState()
        self.batches: Iterator[Batch] = iter(())
        self.position: Any = None
        self._step_samples = self._skipped_samples = 0
        self._window_start, self._window_samples = time.perf_counter(), 0

    def restore(self) -> None:
        """Load the checkpoint `checkpoint.resume` names (auto = the newest that verifies), then
        start the data streams: a resumed run continues each at the sample after its last."""
        cfg, accelerator = self.cfg, self.accelerator
        saved = restore_run_checkpoint(accelerator, self.run_dir, cfg.checkpoint,
                                       model=self.model, optimizer=self.optimizer)
        if saved is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
            apply_optim_settings(self.optimizer, self.scheduler, cfg.optim, say=accelerator.print)
            saved["nonfinite_streak"] = 0  # a fresh streak from good weights (vlp.train.nonfinite)
            saved["data"] = rank_data_position(cfg, accelerator, saved.get("data"))
            fields = {f.name for f in dataclasses.fields(TrainState)}
            self.state = TrainState(**{k: v for k, v in saved.items() if k in fields})
        loader, self.position = build_batches(cfg, self.data.train_shards, self.bundle,
                                              accelerator, self.state)
        self.batches = iter(loader)

    def step(self) -> StepResult:
        """One optimizer step over `train.grad_accum` micro-batches (no host sync but the update
        decision: the result's tensors stay on the device)."""
        train, accelerator = self.cfg.train, self.accelerator
        self._step_samples = 0
        self._schedule_temperature()
        micro_batches = self._micro_batches()
        diagnosed: list[Diagnostics] = []
        observe = (lambda output: diagnosed.append(step_diagnostics(output))
                   ) if diagnostics_due(train.diagnostics_every, self.state.step + 1) else None
        if train.grad_cache:  # the micro-batches form one contrastive batch
            terms = cached_step_backward(accelerator, self.model, self.objective,
                                         list(micro_batches), observe=observe)
        else:
            terms = accumulated_backward(accelerator, self.model, self.objective, micro_batches,
                                         num_micro_batches=train.grad_accum, observe=observe)
        grad_norm, skipped = apply_update(accelerator, self.model, self.optimizer,
                                          loss=terms["loss"], grad_clip=self.cfg.optim.grad_clip)
        failed = skipped and (accelerator.scaler is None
                              or not bool(torch.isfinite(terms["loss"])))  # syncs when skipped
        clamp_logit_scale(self.bundle.model)
        self.scheduler.step()
        self.state.step += 1
        self.state.samples_seen += self._step_samples * accelerator.num_processes
        self._window_samples += self._step_samples
        return StepResult(terms, grad_norm, skipped, failed, self._step_samples,
                          self._skipped_samples, diagnosed[0] if diagnosed else None)

    def _schedule_temperature(self) -> None:
        """A fixed or scheduled temperature: logit_scale = log(1/τ(step)) for this step. A
        function of the step alone, so a resumed run continues it with nothing saved."""
        temperature = self.cfg.loss.temperature
        if not temperature.learned:
            tau = temperature.at(self.state.step, self.cfg.train.steps)
            with torch.no_grad():
                self.bundle.model.logit_scale.fill_(math.log(1.0 / tau))

    def _micro_batches(self) -> Iterator[Batch]:
        for _ in range(self.cfg.train.grad_accum):
            batch = next(self.batches)
            self._skipped_samples = self.position.update(batch)
            self._step_samples += len(batch["key"])
            yield batch

    def log(self, result: StepResult) -> dict[str, float]:
        """The step's metrics, read off the device (this is where a log step syncs), sent to
        the trackers and returned."""
        accelerator = self.accelerator
        diagnostics = result.diagnostics or Diagnostics({})
        names, diag_names = list(result.terms), list(diagnostics.scalars)
        device_values = [*(result.terms[n] for n in names),
                         *(diagnostics.scalars[n] for n in diag_names), result.grad_norm,
                         self.bundle.model.logit_scale.detach().exp()]
        values = torch.stack([_full(v).float() for v in device_values]).tolist()
        skipped_samples = torch.tensor(result.skipped_samples, device=accelerator.device)
        if accelerator.num_processes > 1:
            skipped_samples = accelerator.reduce(skipped_samples, "sum")
        elapsed = time.perf_counter() - self._window_start
        metrics = {
            **{("loss" if n == "loss" else f"loss_{n}"): v for n, v in zip(names, values[:len(names)], strict=True)},
            "logit_scale": values[-1], "grad_norm": values[-2],
            "skipped_samples": int(skipped_samples), "lr": self.scheduler.get_last_lr()[0],
            "samples_seen": self.state.samples_seen, "skipped_steps": self.state.skipped_steps,
            "samples_per_s": self._window_samples * accelerator.num_processes / elapsed,
            **dict(zip(diag_names, values[len(names):-2], strict=True)),
        }
        accelerator.log(metrics, step=self.state.step)
        log_histograms(accelerator, diagnostics.histograms, step=self.state.step)
        self._window_start, self._window_samples = time.perf_counter(), 0
        return metrics

    def save(self) -> bool:
        """Checkpoint `state.step` (every rank calls this; see `vlp.train.checkpointing`);
        False when the non-finite guard refuses to (`vlp.train.nonfinite.good_to_save`)."""
        state, accelerator = self.state, self.accelerator
        if not good_to_save(accelerator, self.model, state, run_dir=self.run_dir):
            return False
        state.scheduler = self.scheduler.state_dict()
        state.data = self.position.state_dict()
        trainer_state = {k: v for k, v in dataclasses.asdict(state).items() if k != "step"}
        trainer_state["data"] = gather_data_position(self.cfg, accelerator, state.data)
        spec = self.bundle.spec
        save_run_checkpoint(accelerator, self.run_dir, self.cfg.checkpoint, step=state.step,
                            model=self.model, optimizer=self.optimizer,
                            trainer_state=trainer_state, model_info=spec.model_info(),
                            config_yaml=self.config_yaml, files=spec.checkpoint_files())
        return True

    def evaluate(self, suite: Suite) -> SuiteResult | None:
        """Run `suite` (see `evaluate_on_ranks`): files go to `<run>/eval/step-NNNNNNNNN/`,
        metrics to the trackers as `eval/<benchmark>/<metric>`."""
        step = self.state.step
        result = evaluate_on_ranks(
            self.accelerator, self.model, self.bundle, suite, self.run_dir / "eval" / f"step-{step:09d}",
            step=step, batch_size=self.cfg.eval.batch_size, model_name=self.cfg.model.name)
        if result is not None:
            self.accelerator.log(result.flat_metrics("eval"), step=step)
        return result

    def close_data(self) -> None:
        """Stop the data loader's workers now. They ignore SIGTERM (`vlp.stop_signals`), so the
        interpreter's exit, which terminates leftover children with SIGTERM and then joins
        them, would wait for them forever if the loader's iterator were still alive then."""
        shutdown = getattr(self.batches, "_shutdown_workers", None)  # torch's worker iterator
        if shutdown is not None:
            shutdown()
        self.batches = iter(())

    def num_parameters(self) -> tuple[int, int]:
        """(all, trainable) parameters of the model."""
        params = list(self.bundle.model.parameters())
        return (sum(p.numel() for p in params),
                sum(p.numel() for p in params if p.requires_grad))


def evaluate_on_ranks(accelerator: Accelerator, model: torch.nn.Module, bundle: ModelBundle,
                      suite: Suite, out_dir: Path, *, step: int, batch_size: int,
                      model_name: str) -> SuiteResult | None:
    """Run `suite` on the main process while the others wait; returns its result there, None
    elsewhere. `model` is the prepared model, `bundle.model` the open_clip model inside it.

    Under FSDP2 the suite's `encode_image`/`encode_text` calls cannot run on the sharded model
    (its root unit is gathered only around `forward`), so every rank takes part in gathering the
    full weights and the main process evaluates an unsharded copy.
    """
    evaluated = bundle.model
    if accelerator.is_fsdp2:
        evaluated = unsharded_copy(model, bundle, device=accelerator.device)
    result = None
    if accelerator.is_main_process:
        result = evaluate_suite(evaluated, bundle.tokenizer, bundle.preprocess_val, suite,
                                out_dir, step=step, batch_size=batch_size,
                                model_name=model_name, progress=False)
    accelerator.wait_for_everyone()
    return result


def unsharded_copy(model: torch.nn.Module, bundle: ModelBundle, *,
                   device: torch.device) -> torch.nn.Module | None:
    """The open_clip model with the full weights of the sharded `model` (a collective: call it
    on every rank; the main process gets the copy, the others None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    if not weights:  # not rank 0
        return None
    copy = create_model(bundle.spec)[0]
    copy.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    return copy.to(device)


def _full(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor (the whole of a DTensor, as FSDP2 gives the gradient norm)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
