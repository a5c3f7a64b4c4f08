"""`vlp eval --checkpoint A B ...` (or `--all-steps RUN`): several checkpoints, one after another
in one process.

Each checkpoint's suite run is written to its own subfolder of the output folder as soon as it
is done (`step-000000200/`, named after the checkpoint folder; `run-step-000000200/` when two
checkpoints share a name), and the top of the folder holds `results.json` and `report.md`: one
row per checkpoint with each benchmark's headline metric, rewritten after every checkpoint, and,
when the checkpoints are steps of one run, `plots/steps.png` (headline metrics against the step).

Checkpoints whose transform (or tokenizer) is built from the same configuration share one
transform (tokenizer) object, so the images decoded and the captions tokenized for the first
checkpoint are kept for the others (`vlp.eval.cache`); a checkpoint whose text tower has the
same architecture and weights as the previous one's (a LiT run: the tower is locked) starts from
its caption features and encodes no caption again. A checkpoint that fails to load (or to
evaluate) is reported in one line naming it and skipped: the others still run, its row in the
summary says what failed, and `vlp eval` exits with status 1.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlp.checkpoint import (
    MODEL_CONFIG,
    CheckpointError,
    checkpoint_step,
    is_checkpoint_name,
    list_checkpoints,
    resolve_checkpoint,
)
from vlp.eval.cache import keep_text_features, kept_text_features
from vlp.eval.loading import OPEN_CLIP_PREFIX, LoadedModel, load_model
from vlp.eval.plots import plot_lines
from vlp.eval.report import _fmt, _row
from vlp.eval.results import json_number, write_json
from vlp.eval.runner import PLOTS_DIR, REPORT_FILE, RESULTS_FILE, evaluate_suite
from vlp.eval.suite import Suite
from vlp.eval.tasks import TASKS

STEPS_PLOT = "steps.png"


@dataclass
class CheckpointRow:
    """One checkpoint of a multi-checkpoint evaluation: where its results went, its headline
    metrics, or why it has none."""

    name: str
    """Its subfolder of the output folder."""
    checkpoint: str
    """The checkpoint folder (a run folder resolved to its latest) or open_clip model evaluated."""
    step: int | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    """Benchmark → its task's headline metric (`vlp.eval.tasks.Task.headline`)."""
    error: str | None = None


def expand_checkpoints(specs: Sequence[str], *, all_steps: bool = False) -> list[str]:
    """The checkpoints to evaluate, in order. A checkpoint folder stands for itself, a run folder
    for its latest checkpoint or, with `all_steps`, for every `step-N` checkpoint in it in step
    order; an `open_clip:` model for itself. A folder that is neither raises here, naming it,
    before anything is evaluated."""
    checkpoints: list[str] = []
    for spec in specs:
        if spec.startswith(OPEN_CLIP_PREFIX):
            checkpoints.append(spec)
            continue
        path = Path(spec)
        if all_steps and path.is_dir() and not (path / MODEL_CONFIG).is_file():
            steps = list_checkpoints(path)
            if not steps:
                raise CheckpointError(f"--all-steps: {path} holds no step-N checkpoint folder")
            checkpoints += [str(step) for step in steps]
        else:
            checkpoints.append(str(resolve_checkpoint(path)))
    return checkpoints


def folder_names(checkpoints: Sequence[str]) -> list[str]:
    """Each checkpoint's subfolder: its folder's name (`step-000000200`), or the open_clip model's
    name; where two would be the same, the run's name first (`run-step-000000200`), then `-2`,
    `-3`, ... for what is still the same."""
    short = [_safe(_short_name(c)) for c in checkpoints]
    names = [name if short.count(name) == 1 else _safe(_long_name(checkpoint))
             for name, checkpoint in zip(short, checkpoints, strict=True)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _short_name(checkpoint: str) -> str:
    if checkpoint.startswith(OPEN_CLIP_PREFIX):
        return checkpoint[len(OPEN_CLIP_PREFIX):].split(":")[0]
    return Path(checkpoint).name


def _long_name(checkpoint: str) -> str:
    if checkpoint.startswith(OPEN_CLIP_PREFIX):
        return _short_name(checkpoint)
    path = Path(checkpoint).resolve()
    return f"{path.parent.name}-{path.name}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def checkpoint_of_step(checkpoint: str) -> int | None:
    """The training step of a `step-N` checkpoint folder; None for anything else."""
    if checkpoint.startswith(OPEN_CLIP_PREFIX) or not is_checkpoint_name(Path(checkpoint).name):
        return None
    return checkpoint_step(Path(checkpoint))


def evaluate_checkpoints(
    checkpoints: Sequence[str],
    suite: Suite,
    out_dir: str | Path,
    *,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[CheckpointRow], dict[str, Path]]:
    """Evaluate `checkpoints` (see `expand_checkpoints`) one after another on `suite`, each into
    its subfolder of `out_dir`, rewriting the summary after each (see the module docstring);
    returns the rows and the summary's files (`results`, `report`, maybe `plot`)."""
    out_dir = Path(out_dir)
    rows = [CheckpointRow(name, checkpoint, checkpoint_of_step(checkpoint))
            for name, checkpoint in zip(folder_names(checkpoints), checkpoints, strict=True)]
    shared = _Shared()
    files: dict[str, Path] = {}
    for i, row in enumerate(rows, 1):
        if progress:
            print(f"[vlp eval] checkpoint {i} of {len(rows)}: {row.checkpoint}", flush=True)
        try:
            loaded = load_model(row.checkpoint, device=device)
        except (ValueError, OSError) as err:
            row.error = f"did not load: {_one_line(err)}"
        else:
            try:
                row.metrics = _evaluate(loaded, shared, suite, out_dir / row.name, device=device,
                                        step=row.step, progress=progress)
            except ValueError as err:
                row.error = f"failed: {_one_line(err)}"
            del loaded  # before the next checkpoint is loaded
        if row.error:
            print(f"vlp eval: error: checkpoint {i} of {len(rows)} ({row.checkpoint}) "
                  f"{row.error}; the others still run", file=sys.stderr, flush=True)
        files = write_summary(rows, suite, out_dir)
    return rows, files


@dataclass
class _Shared:
    """What one checkpoint's evaluation hands on to the next: one transform and one tokenizer
    per configuration, and per architecture the caption features of a locked text tower."""

    transforms: dict[str, Callable] = field(default_factory=dict)
    tokenizers: dict[str, Callable] = field(default_factory=dict)
    text_features: dict[str, Any] = field(default_factory=dict)


def _evaluate(loaded: LoadedModel, shared: _Shared, suite: Suite, out_dir: Path, *,
              device: torch.device, step: int | None, progress: bool) -> dict[str, float | None]:
    """Run `suite` on one loaded checkpoint into `out_dir`; its headline metrics."""
    preprocess = _shared(shared.transforms, loaded.preprocess_key, loaded.preprocess)
    tokenizer = _shared(shared.tokenizers, loaded.tokenizer_key, loaded.tokenizer)
    # only evaluated: with no trainable weight, a text tower that hashes the same as the previous
    # checkpoint's of the same architecture (a LiT run's) encodes no caption again
    loaded.model.requires_grad_(False)
    architecture = loaded.architecture_key
    if architecture is not None:
        keep_text_features(loaded.model, shared.text_features.get(architecture))
    result = evaluate_suite(loaded.model, tokenizer, preprocess, suite, out_dir, device=device,
                            model_name=loaded.name, pretrained=loaded.pretrained, step=step,
                            progress=progress)
    if architecture is not None:
        shared.text_features[architecture] = kept_text_features(loaded.model)
    return {spec.name: json_number(result.results[spec.name].metrics.get(
        TASKS[spec.task].headline, float("nan"))) for spec in suite.benchmarks}


def _shared(kept: dict[str, Callable], key: str | None, value: Callable) -> Callable:
    """The object kept under `key` (the first one given with it), else `value`."""
    return value if key is None else kept.setdefault(key, value)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def write_summary(rows: Sequence[CheckpointRow], suite: Suite, out_dir: Path) -> dict[str, Path]:
    """`results.json` and `report.md` at the top of `out_dir` (one row per checkpoint, one
    column per benchmark's headline metric) and, for two or more evaluated steps of one run,
    `plots/steps.png`."""
    headlines = {spec.name: TASKS[spec.task].headline for spec in suite.benchmarks}
    files = {"results": write_json(out_dir / RESULTS_FILE, {
        "suite": suite.name,
        "suite_file": str(suite.path) if suite.path else None,
        "headline_metrics": headlines,
        "checkpoints": [{"name": row.name, "checkpoint": row.checkpoint, "step": row.step,
                         "results": None if row.error else f"{row.name}/{RESULTS_FILE}",
                         "metrics": row.metrics, "error": row.error} for row in rows],
    })}
    lines = [f"# Eval summary: {suite.name}, {len(rows)} checkpoints", "",
             "Each benchmark's headline metric; every metric is in each checkpoint's report.", "",
             _row(["checkpoint", "step", *(f"{b} {m}" for b, m in headlines.items())]),
             _row(["---"] * (2 + len(headlines)))]
    for row in rows:
        label = row.name if row.error else f"[{row.name}]({row.name}/{REPORT_FILE})"
        step = "—" if row.step is None else str(row.step)
        cells = ([row.error.replace("|", "\\|")] + [""] * (len(headlines) - 1) if row.error
                 else [_fmt(row.metrics.get(name)) for name in headlines])
        lines.append(_row([label, step, *cells]))
    lines.append("")
    plot = _steps_plot(rows, headlines, out_dir / PLOTS_DIR / STEPS_PLOT)
    if plot is not None:
        files["plot"] = plot
        lines += [f"![headline metrics against the training step]({PLOTS_DIR}/{STEPS_PLOT})", ""]
    (out_dir / REPORT_FILE).write_text("\n".join(lines))
    files["report"] = out_dir / REPORT_FILE
    return files


def _steps_plot(rows: Sequence[CheckpointRow], headlines: dict[str, str], path: Path
                ) -> Path | None:
    done = [row for row in rows if not row.error]
    runs = {Path(row.checkpoint).resolve().parent for row in rows if row.step is not None}
    if len(done) < 2 or len(runs) != 1 or any(row.step is None for row in rows):
        return None
    series: dict[str, list[tuple[float, float]]] = {
        f"{name} {metric}": [(row.step, row.metrics[name]) for row in done
                             if row.metrics.get(name) is not None]
        for name, metric in headlines.items()}
    return plot_lines(series, path, title=f"{next(iter(runs)).name}: headline metrics",
                      xlabel="training step")


def print_summary(rows: Sequence[CheckpointRow], suite: Suite, files: dict[str, Path]) -> None:
    """The summary table on stdout (a column per benchmark, its headline metric under its name),
    and where the files are."""
    headlines = {spec.name: TASKS[spec.task].headline for spec in suite.benchmarks}
    widths = {name: max(len(name), len(metric), 6) for name, metric in headlines.items()}
    width = max(len("checkpoint"), *(len(row.name) for row in rows))
    print(f"\n{'checkpoint':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in widths.items()))
    print(f"{'':<{width}}  " + "  ".join(f"{headlines[n]:>{w}}" for n, w in widths.items()))
    for row in rows:
        cells = [row.error or ""] if row.error else [
            f"{_fmt(row.metrics.get(n)):>{w}}" for n, w in widths.items()]
        print(f"{row.name:<{width}}  " + "  ".join(cells))
    print(f"\nreport: {files['report']}\nresults: {files['results']}")
    if "plot" in files:
        print(f"plot: {files['plot']}")
