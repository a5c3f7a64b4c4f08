"""The training loop: accelerate for devices, DDP and mixed precision; read it top to bottom.

`train(cfg)` builds every component from its slice of the config, restores the latest
checkpoint when asked, then runs `train_step` until `train.steps`, logging and checkpointing on
the way, and finally writes the loss curve and the zero-shot report.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from vlp.config import ConfigError, RunConfig, dump_config
from vlp.data.cache import prepare_shapesworld, train_shards_spec
from vlp.distributed import build_backend
from vlp.eval.runner import run_suite
from vlp.eval.suite import Suite, load_suite
from vlp.models import DualEncoder, ModelSpec, build_model, model_spec
from vlp.objectives import build_objectives
from vlp.train.checkpointing import restore_run_checkpoint, save_due, save_run_checkpoint
from vlp.train.data_stream import build_batches, gather_data_position, rank_data_position
from vlp.train.grad_cache import grad_cache_step
from vlp.train.metrics import JSONLTracker, plot_loss_curve
from vlp.train.nonfinite import check_finite, good_to_save
from vlp.train.optim import apply_optim_settings, build_optimizer, build_scheduler
from vlp.train.report import write_report
from vlp.train.run_lock import RunLock
from vlp.train.signals import StopRequest

MAX_LOGIT_SCALE = math.log(100.0)


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


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    last_metrics: dict[str, float]
    report: Path | None
    stopped_by_signal: int | None = None


@dataclass
class DataSources:
    train_shards: str
    zeroshot_sets: dict[str, Path]
    shapesworld_root: Path | None = None
    """The generated ShapesWorld folder when training on it (eval suites reuse its sets)."""


def resolve_data(cfg: RunConfig, accelerator: Accelerator) -> DataSources:
    """User shards, or ShapesWorld generated on first use (main process first, others wait)."""
    if cfg.data.shards is not None or cfg.data.hf is not None:
        sets = {"zeroshot": Path(cfg.eval.zeroshot)} if cfg.eval.zeroshot else {}
        return DataSources(cfg.data.shards or "", sets)
    params = dataclasses.asdict(cfg.data.synth)
    with accelerator.main_process_first():
        root = prepare_shapesworld(
            cfg.data.cache_dir, params, progress=accelerator.is_local_main_process
        )
    sets = {"zeroshot": root / "zeroshot", "zeroshot_heldout": root / "zeroshot_heldout"}
    if cfg.eval.zeroshot:
        sets = {"zeroshot": Path(cfg.eval.zeroshot)}
    return DataSources(train_shards_spec(root), sets, shapesworld_root=root)


def has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or torch.backends.mps.is_available()
            or (xpu is not None and xpu.is_available()))


def build_accelerator(cfg: RunConfig, run_dir: Path) -> Accelerator:
    trackers = [JSONLTracker("vlp", run_dir) if t == "jsonl" else t for t in cfg.train.trackers]
    accelerator = Accelerator(
        # Without a GPU, `accelerate launch --multi_gpu` processes must still form a (gloo)
        # process group; accelerate does that only when told it runs on CPU.
        cpu=not has_accelerator_device(),
        # The gradient cache accumulates by itself: accelerate must not divide its loss.
        gradient_accumulation_steps=1 if cfg.train.grad_cache else cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        log_with=trackers or None,
        project_dir=str(run_dir),
    )
    if trackers:
        accelerator.init_trackers("tensorboard")
    return accelerator


def train(cfg: RunConfig) -> RunResult:
    with RunLock(cfg.output_dir):  # one run per output_dir (vlp.train.run_lock)
        return train_locked(cfg)


def train_locked(cfg: RunConfig) -> RunResult:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = build_accelerator(cfg, run_dir)
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    data = resolve_data(cfg, accelerator)
    suite = load_eval_suite(cfg, data, accelerator)

    m = cfg.model
    bundle = build_model(m.name, pretrained=m.pretrained, init_logit_scale=m.init_logit_scale,
                         init_logit_bias=m.init_logit_bias, hf_text_model=m.hf_text_model,
                         hf_text_pooler=m.hf_text_pooler, hf_text_proj=m.hf_text_proj,
                         lock_image=m.lock_image,
                         lock_image_unlocked_groups=m.lock_image_unlocked_groups,
                         lock_text=m.lock_text, lock_text_unlocked_layers=m.lock_text_unlocked_layers)
    backend = build_backend(cfg.loss.backend, tile_size=cfg.loss.tile_size)
    objective = build_objectives(cfg.objectives, backend=backend)
    o = cfg.optim
    optimizer = build_optimizer(bundle.model, lr=o.lr, weight_decay=o.weight_decay,
                                betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = build_scheduler(optimizer, warmup_steps=o.warmup_steps, total_steps=cfg.train.steps)
    model, optimizer = accelerator.prepare(DualEncoder(bundle.model), optimizer)
    state = restore(cfg, run_dir, accelerator, model, optimizer, scheduler)

    # A resumed run continues every data stream at the sample after the last one it used.
    loader, skipped = build_batches(cfg, data.train_shards, bundle, accelerator, state)
    batches = iter(loader)
    progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    window_start, window_samples, metrics = time.perf_counter(), 0, {}
    stop = StopRequest(announce=accelerator.is_main_process).install()
    while state.step < cfg.train.steps:
        step_metrics = train_step(cfg, accelerator, model, objective, optimizer, batches, skipped)
        scheduler.step()
        state.step += 1
        state.samples_seen += step_metrics.pop("samples")
        state.data = skipped.state_dict()
        check_finite(cfg, state, step_metrics.pop("skipped_step"))
        window_samples += step_metrics["samples_per_rank"]
        progress.update(1)
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {**step_metrics, "lr": scheduler.get_last_lr()[0],
                       "samples_seen": state.samples_seen, "skipped_steps": state.skipped_steps,
                       "samples_per_s": window_samples * accelerator.num_processes / elapsed}
            accelerator.log(metrics, step=state.step)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            window_start, window_samples = time.perf_counter(), 0
        stopping = stop.requested(accelerator)
        if stopping or save_due(cfg.checkpoint, state.step, last=state.step == cfg.train.steps):
            save(cfg, run_dir, accelerator, model, optimizer, scheduler, state)
        if stopping:
            break
        if suite is not None and eval_due(cfg, state.step):
            evaluate_suite_now(cfg, accelerator, model, bundle, suite, run_dir, state.step)
    stop.uninstall()
    progress.close()
    if state.step < cfg.train.steps:
        accelerator.print(f"stopped by signal at step {state.step}; checkpoint saved in {run_dir}")
        accelerator.end_training()
        return RunResult(run_dir, state.step, metrics, None, stopped_by_signal=stop.signum or 0)

    report = None
    if accelerator.is_main_process:
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        report = write_report(run_dir, accelerator.unwrap_model(model).model, bundle,
                              data.zeroshot_sets, batch_size=cfg.eval.batch_size)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also ends the process group: last
    return RunResult(run_dir, state.step, metrics, report)


def train_step(cfg, accelerator, model, objective, optimizer, batches, skipped) -> dict[str, Any]:
    """One optimizer step over `train.grad_accum` micro-batches; skips non-finite updates."""
    if cfg.train.grad_cache:  # the micro-batches form one contrastive batch
        terms_sum, grad_norm, finite, num_skipped, samples = grad_cache_step(
            cfg, accelerator, model, objective, optimizer, batches, skipped)
        return step_metrics(accelerator, model, terms_sum, grad_norm, finite, num_skipped, samples)
    terms_sum: dict[str, float] = {}
    samples = 0
    for _ in range(cfg.train.grad_accum):
        batch = next(batches)
        num_skipped = skipped.update(batch)
        with accelerator.accumulate(model):
            neg_text = batch.get("neg_text")
            output = model(batch["image"].to(accelerator.device),
                           batch["text"].to(accelerator.device),
                           None if neg_text is None else neg_text.to(accelerator.device))
            terms = objective(output, batch)
            accelerator.backward(terms["loss"])
            grad_norm = torch.tensor(0.0)
            if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            finite = bool(torch.isfinite(terms["loss"]) and torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
            optimizer.zero_grad()
        for name, value in terms.items():
            terms_sum[name] = terms_sum.get(name, 0.0) + value.item() / cfg.train.grad_accum
        samples += len(batch["key"])
    return step_metrics(accelerator, model, terms_sum, grad_norm, finite, num_skipped, samples)


def step_metrics(accelerator, model, terms: dict[str, float], grad_norm, finite: bool,
                 num_skipped: int, samples: int) -> dict[str, Any]:
    """After an update: clamp the temperature, and the step's metrics for the trackers."""
    unwrapped = accelerator.unwrap_model(model).model
    with torch.no_grad():
        unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    skipped_total = accelerator.reduce(torch.tensor(num_skipped, device=accelerator.device), "sum")
    return {
        **{("loss" if k == "loss" else f"loss_{k}"): v for k, v in terms.items()},
        "logit_scale": unwrapped.logit_scale.exp().item(),
        "grad_norm": float(grad_norm),
        "skipped_samples": int(skipped_total),
        "samples_per_rank": samples,
        "samples": samples * accelerator.num_processes,
        "skipped_step": int(not finite),
    }


def load_eval_suite(cfg: RunConfig, data: DataSources, accelerator: Accelerator) -> Suite | None:
    """Check the suite of `eval.suite` before the first step (a ShapesWorld suite reuses the
    training run's ShapesWorld folder)."""
    if cfg.eval.suite is None:
        return None
    paths = {"shapesworld": data.shapesworld_root} if data.shapesworld_root else None
    with accelerator.main_process_first():
        try:
            return load_suite(cfg.eval.suite, overrides=cfg.eval.overrides, paths=paths,
                              progress=accelerator.is_local_main_process)
        except ValueError as err:
            raise ConfigError(f"eval.suite: {err}") from None


def eval_due(cfg: RunConfig, step: int) -> bool:
    return step == cfg.train.steps or (cfg.eval.every > 0 and step % cfg.eval.every == 0)


def evaluate_suite_now(cfg, accelerator, model, bundle, suite: Suite, run_dir: Path,
                       step: int) -> None:
    """Run the suite on the main process (others wait); metrics go to the trackers."""
    if accelerator.is_main_process:
        metrics = run_suite(accelerator.unwrap_model(model).model, bundle.tokenizer,
                            bundle.preprocess_val, suite, run_dir / "eval" / f"step-{step:09d}",
                            step=step, batch_size=cfg.eval.batch_size)
        accelerator.log(metrics, step=step)
    accelerator.wait_for_everyone()


def model_info(cfg: RunConfig) -> ModelSpec:
    """What a checkpoint records about the model (`model_config.json`, `preprocess.json`,
    `text_tower/`): enough to rebuild and feed it without the recipe."""
    m = cfg.model
    return model_spec(m.name, init_logit_scale=m.init_logit_scale,
                      init_logit_bias=m.init_logit_bias, hf_text_model=m.hf_text_model,
                      hf_text_pooler=m.hf_text_pooler, hf_text_proj=m.hf_text_proj)


def save(cfg, run_dir, accelerator, model, optimizer, scheduler, state: TrainState) -> None:
    """Checkpoint `state.step` (every rank calls this; see `vlp.train.checkpointing`)."""
    if not good_to_save(accelerator, model, state, run_dir=run_dir):
        return  # never a checkpoint of failed weights (vlp.train.nonfinite)
    state.scheduler = scheduler.state_dict()
    trainer_state = {k: v for k, v in dataclasses.asdict(state).items() if k != "step"}
    trainer_state["data"] = gather_data_position(cfg, accelerator, state.data)
    spec = model_info(cfg)
    save_run_checkpoint(accelerator, run_dir, cfg.checkpoint, step=state.step, model=model,
                        optimizer=optimizer, trainer_state=trainer_state,
                        model_info=spec.model_info(), config_yaml=dump_config(cfg),
                        files=spec.checkpoint_files())


def restore(cfg, run_dir, accelerator, model, optimizer, scheduler) -> TrainState:
    """Load the checkpoint `checkpoint.resume` names (auto = the newest that verifies)."""
    saved = restore_run_checkpoint(accelerator, run_dir, cfg.checkpoint, model=model,
                                   optimizer=optimizer)
    if saved is None:
        return TrainState()
    scheduler.load_state_dict(saved["scheduler"])
    apply_optim_settings(optimizer, scheduler, cfg.optim, say=accelerator.print)
    saved["nonfinite_streak"] = 0  # a fresh streak from saved weights (vlp.train.nonfinite)
    saved["data"] = rank_data_position(cfg, accelerator, saved.get("data"))
    fields = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in saved.items() if k in fields})
