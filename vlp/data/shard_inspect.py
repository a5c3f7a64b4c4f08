"""`vlp shards inspect` and `vlp shards validate`: count, look at, and check shards.

Both read shards with the training reader (`vlp.data.tar_reader`), so their counts are the
training run's. Validation applies the training pipeline's own rules (`decode_sample`: an
image member PIL can decode, a non-empty UTF-8 caption, the per-sample limits) to every sample,
and reports each corrupt sample once with its shard and key, plus tar data that cannot be read
(key `?`). With `num_negatives`, a sample with fewer distinct hard negatives is reported too
(training would repeat some of them). With `captions`, the json's `captions` (extra true
captions, `data.captions: sample | all`) are checked as training checks them. A missing shard file or a folder is an error, not a
corrupt sample.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlp.data.pipeline import IMAGE_EXTENSIONS, decode_sample, hard_negatives
from vlp.data.sources import expand_shards
from vlp.data.tar_reader import DAMAGE, read_shard


@dataclass
class ShardReport:
    url: str
    samples: int = 0
    members: Counter = field(default_factory=Counter)
    problems: list[dict[str, str]] = field(default_factory=list)


def shard_urls(spec: str) -> list[str]:
    """The shards of a spec; ValueError/FileNotFoundError if a local one is missing or a
    folder."""
    urls = expand_shards(spec)
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            continue
        path = Path(url).expanduser()
        if path.is_dir():
            raise ValueError(f"{url} is a folder, not a shard: give shard files, e.g. "
                             f"'{url.rstrip('/')}/shard-{{000000..000009}}.tar'")
        if not path.exists():
            raise FileNotFoundError(f"no such shard: {url}")
    return urls


def _samples(url: str, report: ShardReport) -> Iterator[dict[str, Any]]:
    """The shard's samples; unreadable data goes to `report.problems` instead."""
    def on_error(exn: Exception) -> bool:
        report.problems.append({"key": "?", "reason": str(exn)})
        return True

    for sample in read_shard(url, on_error):
        if sample["__key__"] == "?" and DAMAGE in sample:
            report.problems.append({"key": "?", "reason": sample[DAMAGE]})
            continue
        yield sample


def _summary(sample: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"key": sample["__key__"],
                           "members": sorted(k for k in sample if not k.startswith("__"))}
    if "txt" in sample:
        out["caption"] = sample["txt"].decode("utf-8", errors="replace")[:200]
    image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if image is not None:
        try:
            with Image.open(io.BytesIO(image)) as img:
                out["image"] = f"{img.format} {img.width}x{img.height} {img.mode}"
        except Exception as e:  # PIL raises many types for bad bytes
            out["image"] = f"unreadable ({e})"
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            out["json"] = meta if len(json.dumps(meta)) < 400 else sorted(meta)
        except json.JSONDecodeError:
            out["json"] = "not JSON"
    for key in ("cls",):
        if key in sample:
            out[key] = sample[key].decode(errors="replace")
    return out


def inspect_shards(spec: str, *, show: int = 3) -> dict[str, Any]:
    """Samples per shard, member types, and the first `show` samples."""
    shards, shown = [], []
    for url in shard_urls(spec):
        report = ShardReport(url)
        for sample in _samples(url, report):
            report.samples += 1
            report.members.update(k for k in sample if not k.startswith("__"))
            if len(shown) < show:
                shown.append({"shard": url, **_summary(sample)})
        shards.append(report)
    return {
        "num_shards": len(shards),
        "num_samples": sum(r.samples for r in shards),
        "members": dict(sum((r.members for r in shards), Counter())),
        "shards": [{"url": r.url, "samples": r.samples} for r in shards],
        "samples": shown,
    }


def _identity(image: Image.Image) -> Image.Image:
    image.load()
    return image


def _keep_caption(captions: list[str]) -> list[str]:
    return captions


def validate_shards(spec: str, *, num_negatives: int = 0, captions: bool = False
                    ) -> dict[str, Any]:
    """Every sample checked with the training pipeline's rules; corrupt members listed."""
    shards = []
    for url in shard_urls(spec):
        report = ShardReport(url)
        for sample in _samples(url, report):
            report.samples += 1
            try:
                decode_sample(sample, _identity, _keep_caption, num_negatives=num_negatives,
                              captions="sample" if captions else "first")
                found = len(set(hard_negatives(sample))) if num_negatives else num_negatives
                if found < num_negatives:
                    raise ValueError(f"{found} distinct hard negatives, fewer than "
                                     f"{num_negatives} (training would repeat some)")
            except ValueError as e:
                report.problems.append({"key": sample.get("__key__", "?"), "reason": str(e)})
        shards.append(report)
    problems = [{"shard": r.url, **p} for r in shards for p in r.problems]
    return {
        "num_shards": len(shards),
        "num_samples": sum(r.samples for r in shards),
        "num_corrupt": len(problems),
        "shards": [{"url": r.url, "samples": r.samples, "corrupt": len(r.problems)}
                   for r in shards],
        "corrupt": problems,
    }
