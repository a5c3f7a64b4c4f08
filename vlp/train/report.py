"""What a run tells its user: the start banner, the run report and the end summary.

The run report is the end-of-run suite's report (`vlp.eval.report.write_report`, the one
report writer) in the run folder, followed by the training summary and the loss curve;
`results.json` maps each benchmark of that suite to its metrics.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.eval.report import write_report
from vlp.eval.results import json_number, write_json
from vlp.eval.runner import SuiteResult
from vlp.train.metrics import plot_diagnostics, plot_loss_curve, read_metrics
from vlp.train.trainer import Trainer

REPORT_FILE = "report.md"
DIAGNOSTICS_PNG = "diagnostics.png"
RESULTS_FILE = "results.json"


def start_banner(trainer: Trainer) -> str:
    """Model and parameter count, data, world size and backends, precision, output folder."""
    cfg, accelerator = trainer.cfg, trainer.accelerator
    total, trainable = trainer.num_parameters()
    group = (torch.distributed.get_backend() if torch.distributed.is_initialized()
             else "no process group")
    resumed = f", resumed at step {trainer.state.step}" if trainer.state.step else ""
    return "\n".join([
        f"vlp train: {cfg.model.name}, {total / 1e6:.2f} M parameters "
        f"({trainable / 1e6:.2f} M trainable)",
        f"  data: {trainer.data.describe()}; batch {cfg.data.batch_size} per rank"
        + (f" x {cfg.train.grad_accum} micro-batches" if cfg.train.grad_accum > 1 else "")
        + (" (gradient cache)" if cfg.train.grad_cache else ""),
        f"  world: {accelerator.num_processes} process(es), {accelerator.distributed_type.value} "
        f"({group}) on {accelerator.device.type}; contrastive backend {cfg.loss.backend}",
        f"  precision: {cfg.train.mixed_precision}"
        f"{' (grad scaler)' if accelerator.scaler is not None else ''}",
        f"  output: {trainer.run_dir}; {cfg.train.steps} steps{resumed}",
    ])


def end_summary(trainer: Trainer, *, seconds: float, report: Path | None) -> str:
    state = trainer.state
    where = f"report: {report}" if report is not None else f"run folder: {trainer.run_dir}"
    return (f"done: {state.step} steps, {state.samples_seen} samples, "
            f"{state.skipped_steps} skipped steps, {seconds / 60:.1f} min; {where}")


NO_ZEROSHOT = ("No zero-shot set was evaluated: this run trained on your own data and "
               "`eval.zeroshot` is not set. Add one with `eval.zeroshot=FOLDER` (a "
               "CLIP_benchmark-layout folder: classnames.txt, zeroshot_classification_templates.txt, "
               "test/*.tar), or run a suite with `eval.suite=...` or `vlp eval --checkpoint "
               "RUN_FOLDER`.")


def write_run_report(run_dir: Path, final: SuiteResult | None) -> Path:
    """Write `loss_curve.png`, `report.md` and `results.json` in `run_dir`; return the report.

    `results.json` maps each benchmark to its metrics, plus `train`: the last step, samples
    seen and training samples skipped as unusable."""
    metrics = run_dir / "metrics.jsonl"
    diagnostics_png = None
    if metrics.is_file():  # the jsonl tracker is on
        plot_loss_curve(metrics, run_dir / "loss_curve.png")
        diagnostics_png = plot_diagnostics(metrics, run_dir / DIAGNOSTICS_PNG)
    report = run_dir / REPORT_FILE
    if final is not None:
        write_report(final, report)
        results = {name: {k: json_number(v) for k, v in result.metrics.items()}
                   for name, result in final.results.items()}
        evaluated = ["Evaluated: " + ", ".join(f"`{b.name}` ({b.data})"
                                               for b in final.suite.benchmarks), ""]
    else:
        report.write_text(f"# vlp run report\n\nRun folder: `{run_dir}`\n\n{NO_ZEROSHOT}\n")
        results, evaluated = {}, []
    records = [r for r in read_metrics(metrics) if "loss" in r] if metrics.is_file() else []
    with report.open("a") as out:
        out.write("\n".join(["", "## Training", "", *evaluated, *_training_lines(records),
                             "![loss curve](loss_curve.png)", ""]))
        if diagnostics_png is not None:
            out.write("\n".join(["", *_diagnostics_lines(read_metrics(metrics)), ""]))
    training = {k: records[-1][k] for k in ("step", "samples_seen", "skipped_samples")
                if records and k in records[-1]}
    write_json(run_dir / RESULTS_FILE, {**results, "train": training})  # NaN (acc5 < 5 classes): null
    return report


def _training_lines(records: list[dict]) -> list[str]:
    if not records:
        return []
    first, last = records[0], records[-1]
    return [f"Trained {last['step']} steps, {last.get('samples_seen', '?')} samples; loss "
            f"{first['loss']:.3f} (step {first['step']}) → {last['loss']:.3f}.", "",
            f"Skipped {last.get('skipped_samples', '?')} unusable training samples (each is "
            "logged with its shard and key; `vlp shards validate` lists them).", ""]


def _diagnostics_lines(records: list[dict]) -> list[str]:
    """The report's diagnostics section: the last diagnostic step's values and the plot."""
    last = [r for r in records if "diag/gap" in r][-1]
    values = ", ".join(f"{k.removeprefix('diag/')} {v:.3f}" for k, v in last.items()
                       if k.startswith("diag/"))
    return ["### Training diagnostics", "",
            "Every `train.diagnostics_every` steps, from the features of the step's last "
            "micro-batch on rank 0 (`vlp.train.diagnostics`; histograms in TensorBoard). "
            f"Step {last['step']}: {values}.", "",
            f"![training diagnostics]({DIAGNOSTICS_PNG})"]
