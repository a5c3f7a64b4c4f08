"""What every benchmark returns, and the CLIP_benchmark-shaped JSON it is written as."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BenchmarkResult:
    """Scores of one benchmark: the metrics trackers and tables show, plus what explains them."""

    metrics: dict[str, float]
    """Headline numbers, fractions in [0, 1] for accuracies and recalls."""
    details: dict[str, Any] = field(default_factory=dict)
    """Counts and breakdowns (per relation, per subset, ...) kept in the JSON, not tracked."""
    notes: list[str] = field(default_factory=list)
    """What the reader must know: skipped subsets, the tagger used, fallbacks."""
    plots: dict[str, Path] = field(default_factory=dict)
    """Caption → PNG written for this benchmark."""


def result_record(
    result: BenchmarkResult, *, dataset: str, model: str, pretrained: str | None, task: str
) -> dict[str, Any]:
    """CLIP_benchmark's result shape (`dataset, model, pretrained, task, metrics`) plus vlp's
    `details` and `notes`, which CLIP_benchmark's tools ignore."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": {k: json_number(v) for k, v in result.metrics.items()},
        "details": result.details,
        "notes": result.notes,
    }


def write_json(path: Path, value: Any) -> Path:
    """Write JSON atomically (a crash never leaves half a result file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def json_number(value: float) -> float | None:
    """NaN and infinities are not JSON; they are written as null."""
    value = float(value)
    return value if math.isfinite(value) else None
