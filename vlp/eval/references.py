"""Published numbers printed beside a model's own in eval reports (`eval/reference/*.yaml`).

    model: CLIP ViT-B/32 (OpenAI weights)
    results:
      - benchmark: sugarcrepe          # matched against suite benchmark names
        source: Hsieh et al., 2023, SugarCrepe, Table ...   # where the numbers were read
        note: swap_obj has 245 items today, 246 in the paper  # optional: data changed since
        verified: true                   # false: transcribed, not checked against the source
        metrics: {replace_obj: 0.9092, ...}   # vlp's metric names, fractions in [0, 1]

Only numbers the files cite appear; a benchmark or metric a file does not mention is shown
without a reference. Reports mark unverified numbers with a dagger.
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
    """benchmark → citation of the table the numbers come from, with its notes."""
    path: Path | None = None
    unverified: frozenset[tuple[str, str]] = frozenset()
    """(benchmark, metric) pairs whose numbers were not checked against their source."""


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
    unverified: set[tuple[str, str]] = set()
    if not isinstance(raw["results"], list):
        raise ValueError(f"{path}: 'results' must be a list")
    for i, entry in enumerate(raw["results"]):
        where = f"{path}: results[{i}]"
        check_keys(entry, {"benchmark", "source", "metrics", "note", "verified"}, where,
                   required={"benchmark", "source", "metrics", "verified"})
        if not isinstance(entry["verified"], bool):
            raise ValueError(f"{where}.verified: expected true or false, got {entry['verified']!r}")
        name = str(entry["benchmark"])
        if not isinstance(entry["metrics"], dict) or not entry["metrics"]:
            raise ValueError(f"{where}.metrics: expected a non-empty mapping")
        for metric, value in entry["metrics"].items():
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{where}.metrics.{metric}: expected a fraction in [0, 1], "
                                 f"got {value!r}")
        metrics.setdefault(name, {}).update({str(k): float(v)
                                             for k, v in entry["metrics"].items()})
        if not entry["verified"]:
            unverified.update((name, str(k)) for k in entry["metrics"])
        source = " ".join(str(entry["source"]).split())
        if entry.get("note"):
            source += f" (note: {' '.join(str(entry['note']).split())})"
        if not entry["verified"]:
            source += " [unverified: transcribed by hand, not checked against the source]"
        sources[name] = "; ".join(filter(None, (sources.get(name), source)))
    return Reference(str(raw["model"]), metrics, sources, path, frozenset(unverified))


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
