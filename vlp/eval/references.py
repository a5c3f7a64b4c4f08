"""Published numbers printed beside a model's own in eval reports (`eval/reference/*.yaml`).

    model: CLIP ViT-B/32 (OpenAI weights)
    results:
      - benchmark: sugarcrepe          # matched against suite benchmark names
        source: Hsieh et al., 2023, SugarCrepe, Table ...
        metrics: {replace_obj: 0.909, ...}   # vlp's metric names, fractions in [0, 1]

Only numbers the files cite appear; a benchmark or metric a file does not mention is shown
without a reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Reference:
    """One published model's numbers, per benchmark name and metric."""

    model: str
    metrics: dict[str, dict[str, float]]
    """benchmark → metric → value."""
    sources: dict[str, str]
    """benchmark → citation of the table the numbers come from."""
    path: Path | None = None


def load_reference(path: str | Path) -> Reference:
    """Read a reference file strictly (unknown keys, missing sources and values outside
    [0, 1] raise a ValueError naming the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference file {path} not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    check_keys(raw, {"model", "results", "notes"}, f"{path}", required={"model", "results"})
    metrics: dict[str, dict[str, float]] = {}
    sources: dict[str, str] = {}
    if not isinstance(raw["results"], list):
        raise ValueError(f"{path}: 'results' must be a list")
    for i, entry in enumerate(raw["results"]):
        where = f"{path}: results[{i}]"
        check_keys(entry, {"benchmark", "source", "metrics"}, where, required={"benchmark", "source",
                                                                         "metrics"})
        name = str(entry["benchmark"])
        if not isinstance(entry["metrics"], dict) or not entry["metrics"]:
            raise ValueError(f"{where}.metrics: expected a non-empty mapping")
        for metric, value in entry["metrics"].items():
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{where}.metrics.{metric}: expected a fraction in [0, 1], "
                                 f"got {value!r}")
        metrics.setdefault(name, {}).update({str(k): float(v)
                                             for k, v in entry["metrics"].items()})
        sources[name] = "; ".join(filter(None, (sources.get(name), str(entry["source"]))))
    return Reference(str(raw["model"]), metrics, sources, path)


def check_keys(
    raw: Any, allowed: set[str], where: str, *, required: frozenset[str] | set[str] = frozenset()
) -> None:
    """`raw` is a mapping with only `allowed` keys and every `required` one; else a ValueError
    naming `where` and the keys."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(raw))
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
