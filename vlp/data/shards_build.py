"""`vlp shards build`, `negatives` and `rewrites`: write and rewrite webdataset training shards.

Inputs (one record = an image file or image bytes, and its caption):
- an image folder whose images have sidecar captions (`cat/001.jpg` + `cat/001.txt`);
- a CSV/TSV/parquet table of (local image path, caption), paths relative to the table;
- a Hugging Face dataset (`save_to_disk` folder or a local folder `load_dataset` reads).

Output: `{prefix}-{000000..N}.tar` with samples `KEY.{jpg,png,webp}`, `KEY.txt` and `KEY.json`
(`{"source": ...}`), keys `{index:09d}` in input order (so a rebuild gives the same keys);
`stats.json` (samples, bytes, caption length distribution, per-shard counts, what was skipped)
and `sizes.json` (samples per shard, which open_clip's trainer reads). Shards are written in
parallel, one process per core, behind a progress bar. Unreadable images are skipped and listed.
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
PATH_COLUMNS = ("path", "filepath", "file", "image_path", "image", "filename")
TEXT_COLUMNS = ("caption", "text", "txt", "title", "sentence")
_TAR_MTIME = 0  # fixed member times: the same input gives byte-identical shards


@dataclass(frozen=True)
class Record:
    """One sample to write: where its image is, its caption, and extra json fields."""

    image: str | bytes | HFImage
    caption: str
    source: str
    extra: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- inputs


def folder_records(folder: str | Path) -> list[Record]:
    """Every image under `folder` (recursively, sorted) that has a sidecar `.txt` caption."""
    folder = Path(folder)
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            records.append(Record(str(path), caption_file.read_text(errors="replace").strip(),
                                  str(path.relative_to(folder))))
    if not records:
        raise ValueError(f"{folder}: no image with a sidecar .txt caption")
    return records


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str,
          where: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{where}: no {what} column {wanted!r}; columns: {columns}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(f"{where}: no {what} column (tried {', '.join(defaults)}); name it with "
                     f"--{what}-column; columns: {columns}")


def table_records(table: str | Path, *, image_column: str | None = None,
                  text_column: str | None = None) -> list[Record]:
    """Rows of a .csv/.tsv/.parquet of (image path, caption); relative paths are taken from
    the table's folder."""
    import pandas as pd

    table = Path(table)
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(table)
    elif suffix in (".csv", ".tsv"):
        frame = pd.read_csv(table, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                            keep_default_na=False)
    else:
        raise ValueError(f"{table}: expected a .csv, .tsv or .parquet table")
    columns = list(frame.columns)
    path_col = _pick(columns, image_column, PATH_COLUMNS, "image", str(table))
    text_col = _pick(columns, text_column, TEXT_COLUMNS, "text", str(table))
    records = []
    for path, caption in zip(frame[path_col], frame[text_col], strict=True):
        full = Path(path) if Path(path).is_absolute() else table.parent / path
        records.append(Record(str(full), "" if caption is None else str(caption), str(path)))
    return records


@dataclass(frozen=True)
class HFImage:
    """A row's image in a Hugging Face dataset, read by the process that writes its shard."""

    path: str
    split: str | None
    column: str
    index: int


@functools.lru_cache(maxsize=4)
def _hf_images(path: str, split: str | None, column: str):
    import datasets

    from vlp.data.sources import load_hf_dataset

    dataset = load_hf_dataset(path, split).select_columns([column])
    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _hf_image_bytes(ref: HFImage) -> bytes:
    from vlp.data.sources import _image_bytes

    return _image_bytes(_hf_images(ref.path, ref.split, ref.column)[ref.index][ref.column],
                        f"{ref.path}[{ref.index}]")


def hf_records(path: str, *, split: str | None = "train", image_column: str = "image",
               text_column: str = "text") -> list[Record]:
    """Rows of a Hugging Face dataset; images are read later, by the shard writers."""
    from vlp.data.sources import HFSource, load_hf_dataset

    source = HFSource(load_hf_dataset(path, split), image_column=image_column,
                      text_column=text_column, name=path)
    captions = source.dataset.select_columns([text_column])[text_column]
    return [Record(HFImage(path, split, image_column, index), str(caption or ""),
                   f"{path}[{index}]") for index, caption in enumerate(captions)]


# ----------------------------------------------------------------------------- writing


def _image_payload(image: str | bytes | HFImage, resize: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of a checked image; resized (shorter side) and re-encoded if asked."""
    if isinstance(image, HFImage):
        data = _hf_image_bytes(image)
    else:
        data = Path(image).read_bytes() if isinstance(image, str) else image
    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "").lower()
        if resize is None and fmt in ("jpeg", "png", "webp"):
            img.verify()
            return ("jpg" if fmt == "jpeg" else fmt), data
        img = img.convert("RGB")
        if resize is not None and min(img.size) > resize:
            scale = resize / min(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.BICUBIC)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=95)
        return "jpg", out.getvalue()


def _write_shard(job: tuple[str, int, list[Record], int | None]) -> dict[str, Any]:
    path, first_index, records, resize = job
    tmp = path + ".tmp"
    written, nbytes, skipped, lengths = 0, 0, [], []
    with wds.TarWriter(tmp, encoder=False, mtime=_TAR_MTIME) as sink:
        for offset, record in enumerate(records):
            key = f"{first_index + offset:09d}"
            caption = record.caption.strip()
            if not caption:
                skipped.append({"key": key, "source": record.source, "reason": "empty caption"})
                continue
            try:
                ext, data = _image_payload(record.image, resize)
            except Exception as e:  # unreadable file or bytes PIL cannot open
                skipped.append({"key": key, "source": record.source,
                                "reason": f"unreadable image: {e}"})
                continue
            meta = {"source": record.source, **(record.extra or {})}
            sample = {"__key__": key, ext: data, "txt": caption.encode(),
                      "json": json.dumps(meta).encode()}
            sink.write(sample)
            written += 1
            nbytes += sum(len(v) for k, v in sample.items() if k != "__key__")
            lengths.append((len(caption), len(caption.split())))
    os.replace(tmp, path)
    return {"name": Path(path).name, "samples": written, "bytes": nbytes,
            "skipped": skipped, "lengths": lengths}


def _distribution(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {"min": int(array.min()), "mean": round(float(array.mean()), 2),
            "p50": float(np.percentile(array, 50)), "p90": float(np.percentile(array, 90)),
            "p99": float(np.percentile(array, 99)), "max": int(array.max())}


def write_shards(records: list[Record], out: str | Path, *, samples_per_shard: int = 10_000,
                 resize: int | None = None, prefix: str = "shard", workers: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Write `records` as shards into `out`; return (and write) `stats.json`."""
    if samples_per_shard <= 0:
        raise ValueError(f"--samples-per-shard must be > 0, got {samples_per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out / f"{prefix}-{n:06d}.tar"), start, records[start:start + samples_per_shard],
             resize) for n, start in enumerate(range(0, len(records), samples_per_shard))]
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    results = []
    with tqdm(total=len(records), desc="shards", unit="sample", disable=not progress) as bar:
        if workers > 1:
            with multiprocessing.get_context().Pool(workers) as pool:
                for result in pool.imap(_write_shard, jobs):
                    results.append(result)
                    bar.update(len(jobs[len(results) - 1][2]))
        else:
            for job in jobs:
                results.append(_write_shard(job))
                bar.update(len(job[2]))
    return _write_stats(out, results, prefix)


def _write_stats(out: Path, results: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    lengths = [length for r in results for length in r["lengths"]]
    skipped = [s for r in results for s in r["skipped"]]
    last = len(results) - 1
    stats = {
        "num_samples": sum(r["samples"] for r in results),
        "num_shards": len(results),
        "total_bytes": sum(r["bytes"] for r in results),
        "spec": str(out / f"{prefix}-{{000000..{last:06d}}}.tar") if results else None,
        "caption_chars": _distribution([c for c, _ in lengths]),
        "caption_words": _distribution([w for _, w in lengths]),
        "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"]}
                   for r in results],
        "num_skipped": len(skipped),
        "skipped": skipped[:1000],
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    (out / "sizes.json").write_text(json.dumps({r["name"]: r["samples"] for r in results},
                                               indent=1) + "\n")
    return stats


# ----------------------------------------------------------------------------- negatives


def _annotate_shard(src: str, dst: str,
                    annotate: Callable[[str, str, dict[str, Any]], int]) -> tuple[int, int, int]:
    """Copy shard `src` to `dst`, letting `annotate(caption, key, json)` add fields to each
    sample's json (returning how many captions it added); every other member is kept.
    Returns (samples, samples with an addition, additions)."""
    samples = with_added = added = 0
    tmp = dst + ".tmp"
    with wds.TarWriter(tmp, encoder=False, mtime=_TAR_MTIME) as sink:
        for sample in _raw_samples(src):
            samples += 1
            out = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
            except json.JSONDecodeError:
                meta = {}
            count = annotate(caption, sample["__key__"], meta)
            out["json"] = json.dumps(meta).encode()
            sink.write(out)
            with_added += bool(count)
            added += count
    os.replace(tmp, dst)
    return samples, with_added, added


def _parser(spacy_model: str | None) -> Callable:
    from vlp.data.negatives import parse_rules, spacy_parser

    return spacy_parser(spacy_model) if spacy_model else parse_rules


def _add_negatives_job(job: tuple[str, str, int, int | str, str | None]) -> dict[str, int]:
    from vlp.data.negatives import hard_negatives

    src, dst, num, seed, spacy_model = job
    parse = _parser(spacy_model)

    def annotate(caption: str, key: str, meta: dict[str, Any]) -> int:
        pairs = hard_negatives(caption, num=num, seed=f"{seed}/{key}",
                               parse=parse) if caption else []
        meta["neg_captions"] = [text for text, _ in pairs]
        meta["neg_kinds"] = [kind for _, kind in pairs]
        return len(pairs)

    samples, with_added, added = _annotate_shard(src, dst, annotate)
    return {"samples": samples, "with_negatives": with_added, "negatives": added}


def _add_rewrites_job(job: tuple[str, str, int, int | str, str | None]) -> dict[str, int]:
    from vlp.data.rewrites import rewrites

    src, dst, num, seed, spacy_model = job
    parse = _parser(spacy_model)

    def annotate(caption: str, key: str, meta: dict[str, Any]) -> int:
        pairs = rewrites(caption, num=num, seed=f"{seed}/{key}", parse=parse) if caption else []
        meta["captions"] = [text for text, _ in pairs]
        meta["caption_kinds"] = [kind for _, kind in pairs]
        return len(pairs)

    samples, with_added, added = _annotate_shard(src, dst, annotate)
    return {"samples": samples, "with_rewrites": with_added, "rewrites": added}


def _raw_samples(url: str) -> Iterator[dict[str, Any]]:
    return wds.tarfile_to_samples()(iter([{"url": url}]))


def add_negatives(spec: str, out: str | Path, *, num: int = 3, seed: int = 0,
                  spacy_model: str | None = None, workers: int | None = None,
                  progress: bool = True) -> dict[str, int]:
    """Copy the shards of `spec` into `out` with `neg_captions` (and `neg_kinds`) in each
    sample's json, keeping every other member as it was."""
    return _annotate_shards(_add_negatives_job, "negatives", spec, out, num=num, seed=seed,
                            spacy_model=spacy_model, workers=workers, progress=progress)


def add_rewrites(spec: str, out: str | Path, *, num: int = 3, seed: int = 0,
                 spacy_model: str | None = None, workers: int | None = None,
                 progress: bool = True) -> dict[str, int]:
    """Copy the shards of `spec` into `out` with rule-based rewrites of each caption
    (`vlp.data.rewrites`) as `captions` (and `caption_kinds`) in its json, replacing any
    already there, for `data.captions: sample | all`; every other member is kept."""
    return _annotate_shards(_add_rewrites_job, "rewrites", spec, out, num=num, seed=seed,
                            spacy_model=spacy_model, workers=workers, progress=progress)


def _annotate_shards(job_fn: Callable[[tuple], dict[str, int]], what: str, spec: str,
                     out: str | Path, *, num: int, seed: int, spacy_model: str | None,
                     workers: int | None, progress: bool) -> dict[str, int]:
    from vlp.data.sources import expand_shards

    if spacy_model:
        try:
            import spacy

            spacy.load(spacy_model)
        except (ImportError, OSError) as e:
            raise ValueError(f"--spacy {spacy_model}: cannot load the spaCy pipeline ({e}); "
                             "install spacy and the model, or leave --spacy out") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_shards(spec)
    jobs = [(url, str(out / Path(url).name), num, seed, spacy_model) for url in urls]
    totals = {"shards": len(jobs), "samples": 0, f"with_{what}": 0, what: 0}
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    with tqdm(total=len(jobs), desc=what, unit="shard", disable=not progress) as bar:
        if workers > 1:
            with multiprocessing.get_context().Pool(workers) as pool:
                results = pool.imap(job_fn, jobs)
                for counts in results:
                    bar.update(1)
                    for key, value in counts.items():
                        totals[key] += value
        else:
            for job in jobs:
                for key, value in job_fn(job).items():
                    totals[key] += value
                bar.update(1)
    return totals
