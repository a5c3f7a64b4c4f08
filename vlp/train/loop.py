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

from vlp import checkpoint
from vlp.config import RunConfig, dump_config
from vlp.data.cache import prepare_shapesworld, train_shards_spec
from vlp.data.pipeline import SkippedTotal, build_train_loader
from vlp.distributed import build_backend
from vlp.models import DualEncoder, ModelSpec, build_model, model_spec
from vlp.objectives import build_objectives
from vlp.train.metrics import JSONLTracker, plot_loss_curve
from vlp.train.optim import build_optimizer, build_scheduler
from vlp.train.report import write_report
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


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    last_metrics: dict[str, float]
    report: Path | None
    stopped_by_signal: int | None = None


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class DataSources:
    train_shards: str
    zeroshot_sets: dict[str, Path]


def resolve_data(cfg: RunConfig, accelerator: Accelerator) -> DataSources:
    """User shards, or ShapesWorld generated on first use (main process first, others wait)."""
    if cfg.data.shards is not None:
        sets = {"zeroshot": Path(cfg.eval.zeroshot)} if cfg.eval.zeroshot else {}
        return DataSources(cfg.data.shards, sets)
    params = dataclasses.asdict(cfg.data.synth)
    with accelerator.main_process_first():
        root = prepare_shapesworld(
            cfg.data.cache_dir, params, progress=accelerator.is_local_main_process
        )
    sets = {"zeroshot": root / "zeroshot", "zeroshot_heldout": root / "zeroshot_heldout"}
    if cfg.eval.zeroshot:
        sets = {"zeroshot": Path(cfg.eval.zeroshot)}
    return DataSources(train_shards_spec(root), sets)


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
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        log_with=trackers or None,
        project_dir=str(run_dir),
    )
    if trackers:
        accelerator.init_trackers("tensorboard")
    return accelerator


def train(cfg: RunConfig) -> RunResult:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = build_accelerator(cfg, run_dir)
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    data = resolve_data(cfg, accelerator)

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

    # The data stream is re-seeded with the resume step so a resumed run reads new samples.
    loader = build_train_loader(
        data.train_shards, preprocess=bundle.preprocess_train, tokenizer=bundle.tokenizer,
        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed * 100_003 + state.step,
        rank=accelerator.process_index, num_negatives=cfg.data.num_negatives,
    )
    batches, skipped = iter(loader), SkippedTotal()
    progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    window_start, window_samples, metrics = time.perf_counter(), 0, {}
    stop = StopRequest().install()
    while state.step < cfg.train.steps:
        step_metrics = train_step(cfg, accelerator, model, objective, optimizer, batches, skipped)
        scheduler.step()
        state.step += 1
        state.samples_seen += step_metrics.pop("samples")
        check_finite(cfg, state, step_metrics.pop("skipped_step"),
                     lambda: save(cfg, run_dir, accelerator, model, optimizer, scheduler, state))
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
        if stopping or state.step % cfg.checkpoint.every == 0 or state.step == cfg.train.steps:
            save(cfg, run_dir, accelerator, model, optimizer, scheduler, state)
        if stopping:
            break
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
    unwrapped = accelerator.unwrap_model(model).model
    with torch.no_grad():
        unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    skipped_total = accelerator.reduce(torch.tensor(num_skipped, device=accelerator.device), "sum")
    return {
        **{("loss" if k == "loss" else f"loss_{k}"): v for k, v in terms_sum.items()},
        "logit_scale": unwrapped.logit_scale.exp().item(),
        "grad_norm": float(grad_norm),
        "skipped_samples": int(skipped_total),
        "samples_per_rank": samples,
        "samples": samples * accelerator.num_processes,
        "skipped_step": int(not finite),
    }


def check_finite(cfg: RunConfig, state: TrainState, skipped_step: int, save_good) -> None:
    """Count skipped (non-finite) steps; after too many in a row, save and stop."""
    state.skipped_steps += skipped_step
    state.nonfinite_streak = state.nonfinite_streak + 1 if skipped_step else 0
    if state.nonfinite_streak >= cfg.train.max_nonfinite_steps:
        save_good()  # the weights are still those of the last finite step
        raise NonFiniteLossError(
            f"{state.nonfinite_streak} consecutive steps had a non-finite loss or gradient "
            f"(up to step {state.step}); the last good state is saved in {cfg.output_dir}. "
            "Lower optim.lr, raise optim.warmup_steps, or check the data."
        )


def model_info(cfg: RunConfig) -> ModelSpec:
    """What a checkpoint records about the model (`model_config.json`, `preprocess.json`,
    `text_tower/`): enough to rebuild and feed it without the recipe."""
    m = cfg.model
    return model_spec(m.name, init_logit_scale=m.init_logit_scale,
                      init_logit_bias=m.init_logit_bias, hf_text_model=m.hf_text_model,
                      hf_text_pooler=m.hf_text_pooler, hf_text_proj=m.hf_text_proj)


def save(cfg, run_dir, accelerator, model, optimizer, scheduler, state: TrainState) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.scheduler = scheduler.state_dict()
        trainer_state = {k: v for k, v in dataclasses.asdict(state).items() if k != "step"}
        spec = model_info(cfg)
        checkpoint.save_checkpoint(
            run_dir, step=state.step, model=accelerator.unwrap_model(model).model,
            optimizer=optimizer, trainer_state=trainer_state, model_info=spec.model_info(),
            config_yaml=dump_config(cfg), keep_last=cfg.checkpoint.keep_last,
            files=spec.checkpoint_files(),
        )
    accelerator.wait_for_everyone()


def restore(cfg, run_dir, accelerator, model, optimizer, scheduler) -> TrainState:
    """Load the checkpoint `checkpoint.resume` names (auto = latest in the run folder)."""
    resume = cfg.checkpoint.resume
    if resume == "never":
        return TrainState()
    ckpt = checkpoint.latest_checkpoint(run_dir) if resume == "auto" else Path(resume)
    if ckpt is None:
        return TrainState()
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint.resume: no checkpoint folder {ckpt}")
    saved = checkpoint.load_checkpoint(ckpt, model=accelerator.unwrap_model(model).model,
                                       optimizer=optimizer)
    scheduler.load_state_dict(saved["scheduler"])
    accelerator.print(f"resumed from {ckpt} at step {saved['step']}")
    fields = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in saved.items() if k in fields})
