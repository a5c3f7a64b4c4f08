"""The Markdown report of a suite run: a summary table, one section per benchmark with every
metric beside the reference models' published numbers, notes, plots, and the citations."""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlp.eval.tasks import TASKS

if TYPE_CHECKING:
    from vlp.eval.references import Reference
    from vlp.eval.runner import SuiteResult


def write_report(result: SuiteResult, path: str | Path) -> Path:
    """Write `report.md` for a suite run; plot links are relative to the report's folder."""
    path = Path(path)
    suite, references = result.suite, result.suite.references
    ref_headers = [r.model for r in references]
    lines = [f"# Eval report: {suite.name}", ""]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += _run_table(result)
    lines += ["## Summary", "", _row(["benchmark", "task", "metric", "value", *ref_headers]),
              _row(["---"] * (4 + len(ref_headers)))]
    for spec in suite.benchmarks:
        bench = result.results[spec.name]
        metric = TASKS[spec.task].headline
        refs = [_ref(r, spec.name, metric) for r in references]
        lines.append(_row([spec.name, spec.task, metric, _fmt(bench.metrics.get(metric)), *refs]))
    lines.append("")
    if any(r.unverified for r in references):
        lines += ["† transcribed from the paper cited under References, not checked against it.",
                  ""]
    for spec in suite.benchmarks:
        bench = result.results[spec.name]
        lines += [f"## {spec.name} ({spec.task})", "",
                  f"Data: `{spec.data}` · {result.seconds[spec.name]:.1f} s", "",
                  _row(["metric", "value", *ref_headers]), _row(["---"] * (2 + len(ref_headers)))]
        for metric, value in bench.metrics.items():
            refs = [_ref(r, spec.name, metric) for r in references]
            lines.append(_row([metric, _fmt(value), *refs]))
        lines.append("")
        lines += [f"- {note}" for note in bench.notes]
        if bench.notes:
            lines.append("")
        for caption, plot in bench.plots.items():
            lines += [f"![{caption}]({_relative(plot, path.parent)})", ""]
    cited = [(r.model, name, source) for r in references for name, source in r.sources.items()
             if name in result.results]
    if cited:
        lines += ["## References", "",
                  "Published numbers, copied from the papers cited (fractions, not percent):", ""]
        lines += [f"- {model}, `{name}`: {source}" for model, name, source in cited]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _run_table(result: SuiteResult) -> list[str]:
    suite = result.suite
    rows = [("model", f"`{result.model_name}`"),
            ("pretrained", f"`{result.pretrained}`" if result.pretrained else "—"),
            ("suite", f"`{suite.path}`" if suite.path else suite.name)]
    if result.step is not None:
        rows.append(("training step", str(result.step)))
    rows += [("device", str(result.device)),
             ("total time", f"{sum(result.seconds.values()):.1f} s"),
             ("date", time.strftime("%Y-%m-%d %H:%M:%S")),
             ("versions", f"python {platform.python_version()}, torch {torch.__version__}")]
    rows += [(f"path `{k}`", f"`{v}`") for k, v in sorted(suite.paths.items())]
    return ["| | |", "|---|---|", *[_row(r) for r in rows], ""]


def _ref(reference: Reference, benchmark: str, metric: str) -> str:
    """A published number, with a dagger when it was not checked against its source."""
    text = _fmt(reference.metrics.get(benchmark, {}).get(metric))
    return text + " †" if (benchmark, metric) in reference.unverified else text


def _row(cells: list[str] | tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "n/a"  # e.g. acc5 with fewer than five classes, NaN as in CLIP_benchmark
    return f"{value:.4f}"


def _relative(plot: Path, folder: Path) -> str:
    try:
        return plot.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return plot.as_posix()
