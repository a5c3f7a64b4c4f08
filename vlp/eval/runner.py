"""Run a suite on a model: every benchmark, its JSON, `results.json` and `report.md`.

`evaluate_suite` is what `vlp eval` calls; `run_suite` is the same for a training loop, and
returns a flat `{"eval/<benchmark>/<metric>": value}` dict for the trackers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlp.eval.cache import suite_cache
from vlp.eval.plots import plot_bars
from vlp.eval.report import write_report
from vlp.eval.results import BenchmarkResult, result_record, write_json
from vlp.eval.suite import Suite, load_suite
from vlp.eval.tasks import TASKS, EvalContext, resolve_device
from vlp.eval.zeroshot import DualEncoder, Preprocess, Tokenizer

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"


@dataclass
class SuiteResult:
    """Every benchmark's result of one suite run, and where they were written."""

    suite: Suite
    results: dict[str, BenchmarkResult]
    seconds: dict[str, float]
    out_dir: Path
    model_name: str
    pretrained: str | None
    device: torch.device
    step: int | None = None
    files: dict[str, Path] = field(default_factory=dict)
    """benchmark name (and `results`, `report`) → file written."""

    def flat_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """`{f"{prefix}/{benchmark}/{metric}": value}` over every benchmark."""
        return {f"{prefix}/{name}/{metric}": value for name, result in self.results.items()
                for metric, value in result.metrics.items()}


def evaluate_suite(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    suite: Suite | str | Path,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    model_name: str = "model",
    pretrained: str | None = None,
    step: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    write_files: bool = True,
) -> SuiteResult:
    """Run every benchmark of `suite` (a Suite or a suite file) and write, under `out_dir`,
    `<benchmark>.json` (CLIP_benchmark's shape), `results.json`, `report.md` and `plots/`.

    `device` defaults to the device of the model's parameters (so a model being trained is
    evaluated where it is); `batch_size` replaces the suite's. The model is put in eval mode for
    each benchmark and its training flag restored after.
    """
    if not isinstance(suite, Suite):
        suite = load_suite(suite, progress=progress)
    device = torch.device(device) if device is not None else _model_device(model)
    out_dir = Path(out_dir)
    context = EvalContext(model, tokenizer, preprocess, device, batch_size or suite.batch_size,
                          suite.num_workers, progress)
    run = SuiteResult(suite, {}, {}, out_dir, model_name, pretrained, device, step)
    # each distinct image root, image file and caption encoded once; a locked text tower's
    # caption features are kept for the model's next run
    with suite_cache(model, tokenizer, device):
        _run_benchmarks(run, context, write_files=write_files, progress=progress)
    if write_files:
        run.files["results"] = write_json(out_dir / RESULTS_FILE, _summary(run))
        run.files["report"] = write_report(run, out_dir / REPORT_FILE)
    return run


def _run_benchmarks(run: SuiteResult, context: EvalContext, *, write_files: bool,
                    progress: bool) -> None:
    suite, out_dir = run.suite, run.out_dir
    for spec in suite.benchmarks:
        task = TASKS[spec.task]
        if progress:
            print(f"[vlp eval] {spec.name} ({spec.task}) on {spec.data}", flush=True)
        start = time.perf_counter()
        result = task.run(context, spec.data, spec.options, out_dir / PLOTS_DIR / spec.name)
        run.seconds[spec.name] = time.perf_counter() - start
        run.results[spec.name] = result
        if write_files:
            _bar_plot(task, spec.name, result, suite, out_dir)
            record = result_record(result, dataset=spec.name, model=run.model_name,
                                   pretrained=run.pretrained, task=task.clip_benchmark_task)
            run.files[spec.name] = write_json(out_dir / f"{spec.name}.json", record)


def run_suite(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    suite: Suite | str | Path,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    step: int | None = None,
    batch_size: int | None = None,
    model_name: str = "model",
    progress: bool = False,
    prefix: str = "eval",
) -> dict[str, float]:
    """Evaluate during training: run `suite` (a loaded Suite, so its checks ran at start-up) on
    the unwrapped model, write its files under `out_dir`, and return
    `{f"{prefix}/{benchmark}/{metric}": value}` for the trackers. Call it on the main process
    only; the model's training flag is restored."""
    result = evaluate_suite(model, tokenizer, preprocess, suite, out_dir, device=device,
                            model_name=model_name, step=step, batch_size=batch_size,
                            progress=progress)
    return result.flat_metrics(prefix)


def _model_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return resolve_device()


def _bar_plot(task: Any, name: str, result: BenchmarkResult, suite: Suite, out_dir: Path) -> None:
    values = {m: result.metrics[m] for m in task.bar_metrics if m in result.metrics}
    if not values:
        return
    references = {r.model: r.metrics[name] for r in suite.references if name in r.metrics}
    path = out_dir / PLOTS_DIR / name / f"{name}.png"
    result.plots[f"{name} accuracies"] = plot_bars(values, path, title=name,
                                                  references=references, chance=task.chance)


def _summary(run: SuiteResult) -> dict[str, Any]:
    return {
        "suite": run.suite.name,
        "suite_file": str(run.suite.path) if run.suite.path else None,
        "model": run.model_name,
        "pretrained": run.pretrained,
        "step": run.step,
        "device": str(run.device),
        "benchmarks": {
            spec.name: {"task": spec.task, "data": str(spec.data),
                        "metrics": result_record(run.results[spec.name], dataset=spec.name,
                                                 model=run.model_name, pretrained=run.pretrained,
                                                 task=spec.task)["metrics"],
                        "seconds": round(run.seconds[spec.name], 3)}
            for spec in run.suite.benchmarks
        },
    }
