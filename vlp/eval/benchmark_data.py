"""Zero-shot benchmarks in the CLIP_benchmark webdataset layout (docs/design.md §5): read and write.

    root/
      classnames.txt                          one class name per line (classification)
      zeroshot_classification_templates.txt   one prompt per line, `{c}` stands for the class
      dataset_type.txt                        optional; `retrieval`, else classification
      test/nshards.txt                        number of shards N
      test/0.tar ... test/{N-1}.tar           samples: an image (webp, png, jpg or jpeg) beside
                                              `cls` (class index) or `txt` (captions, one a line)

Reading follows `clip_benchmark.datasets.builder.build_wds_dataset` (same members, same image
preference order, RGB images, captions split into lines) so that scores are comparable with
published CLIP_benchmark numbers, but bad input raises a ValueError that names the root, file,
sample or member at fault instead of failing deep inside webdataset. `write_benchmark` writes
the same layout (for tests and for generated evaluation sets).
"""

from __future__ import annotations

import io
import numbers
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vlp.stop_signals import ignore_stop_signals

CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"
DATASET_TYPES = (CLASSIFICATION, RETRIEVAL)
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's order of preference
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"

Target = torch.Tensor | list[list[str]]
Sample = tuple[Image.Image, int] | tuple[Image.Image, Sequence[str] | str]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark root, read and checked: what to evaluate and where its shards are."""

    root: Path
    split: str
    dataset_type: str
    """`classification` or `retrieval`."""
    shard_paths: list[Path]
    classnames: list[str] | None
    """Class names indexed by `cls`; None for retrieval benchmarks."""
    templates: list[str] | None
    """Prompt templates with a `{c}` placeholder; None for retrieval benchmarks."""


def read_benchmark(
    root: str | Path,
    *,
    split: str = "test",
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
) -> Benchmark:
    """Read a benchmark root's metadata; `classnames_file`/`templates_file` replace the root's.

    Classification benchmarks need class names and templates (from the root or the overrides);
    retrieval benchmarks ignore both.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"benchmark root {root} is not a directory")
    dataset_type = _read_dataset_type(root)
    shard_paths = _shard_paths(root, split)
    classnames = templates = None
    if dataset_type == CLASSIFICATION:
        classnames = read_lines(
            _metadata_file(root, CLASSNAMES_FILE, classnames_file, "classnames")
        )
        templates = read_templates(
            _metadata_file(root, TEMPLATES_FILE, templates_file, "templates")
        )
    return Benchmark(root, split, dataset_type, shard_paths, classnames, templates)


def read_lines(path: str | Path) -> list[str]:
    """Stripped lines of a text file, trailing blank lines dropped; a blank line between entries
    is an error because it would shift every later class index."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{path} is empty")
    if "" in lines:
        raise ValueError(f"{path} line {lines.index('') + 1} is empty")
    return lines


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one a line, each filled with `template.format(c=classname)`."""
    templates = read_lines(path)
    for number, template in enumerate(templates, start=1):
        try:
            template.format(c="x")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(
                f"{path} line {number}: template {template!r} is not a format string whose only "
                f"field is {{c}} ({err!r})"
            ) from None
    return templates


def count_samples(benchmark: Benchmark) -> int | None:
    """How many samples the shards hold (distinct keys with an image member), read from the tar
    headers without decoding anything; None if a shard cannot be listed (progress bars then
    show no total)."""
    keys = set()
    try:
        for path in benchmark.shard_paths:
            with tarfile.open(path) as tar:
                for member in tar:
                    key, _, extension = member.name.partition(".")
                    if extension.lower() in IMAGE_EXTENSIONS:
                        keys.add((str(path), key))
    except (OSError, tarfile.TarError):
        return None
    return len(keys)


def iter_batches(
    benchmark: Benchmark,
    preprocess: Callable[[Image.Image], torch.Tensor],
    *,
    batch_size: int,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, Target]]:
    """Stream `(images (B,3,H,W), targets)` in shard order (batches of different workers
    interleave when `num_workers` > 0).

    Targets are a LongTensor of class indices (classification) or, for each image, the list of
    its captions (retrieval). Every process reads every shard: evaluation is not split by rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_classes = len(benchmark.classnames) if benchmark.classnames else 0
    decode = _SampleDecoder(preprocess, benchmark.dataset_type, num_classes)
    collate = _collate_captions if benchmark.dataset_type == RETRIEVAL else _collate_classes
    dataset = (
        wds.WebDataset(
            [str(p) for p in benchmark.shard_paths],
            shardshuffle=False,
            nodesplitter=None,
            empty_check=False,
        )
        .map(decode)
        .batched(batch_size, collation_fn=collate, partial=True)
    )
    num_workers = min(num_workers, len(benchmark.shard_paths))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                        worker_init_fn=ignore_stop_signals)
    num_batches = 0
    for batch in loader:
        num_batches += 1
        yield batch
    if num_batches == 0:
        raise ValueError(f"no samples in the shards of {benchmark.root / benchmark.split}")


def write_benchmark(
    root: str | Path,
    samples: Sequence[Sample],
    *,
    dataset_type: str = CLASSIFICATION,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    split: str = "test",
    num_shards: int = 1,
    image_format: str = "png",
) -> Path:
    """Write `(image, class index)` or `(image, captions)` samples as a benchmark root in the
    CLIP_benchmark layout, in order, split into `num_shards` contiguous shards; for tests and
    for generators of evaluation sets."""
    if dataset_type not in DATASET_TYPES:
        raise ValueError(f"dataset_type must be one of {DATASET_TYPES}, got {dataset_type!r}")
    if image_format not in IMAGE_EXTENSIONS:
        raise ValueError(f"image_format must be one of {IMAGE_EXTENSIONS}, got {image_format!r}")
    if not 1 <= num_shards <= max(len(samples), 1):
        raise ValueError(f"num_shards must be between 1 and {len(samples)}, got {num_shards}")
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    if dataset_type == RETRIEVAL:
        (root / DATASET_TYPE_FILE).write_text(RETRIEVAL + "\n", encoding="utf-8")
    else:
        if not classnames or not templates:
            raise ValueError("a classification benchmark needs classnames and templates")
        (root / CLASSNAMES_FILE).write_text("\n".join(classnames) + "\n", encoding="utf-8")
        (root / TEMPLATES_FILE).write_text("\n".join(templates) + "\n", encoding="utf-8")
    (root / split / NSHARDS_FILE).write_text(f"{num_shards}\n", encoding="utf-8")
    bounds = [round(i * len(samples) / num_shards) for i in range(num_shards + 1)]
    for shard in range(num_shards):
        with wds.TarWriter(str(root / split / f"{shard}.tar")) as writer:
            for index in range(bounds[shard], bounds[shard + 1]):
                image, target = samples[index]
                sample = _encode_sample(
                    index, image, target, dataset_type=dataset_type, image_format=image_format
                )
                writer.write(sample)
    return root


def _encode_sample(
    index: int, image: Image.Image, target: Any, *, dataset_type: str, image_format: str
) -> dict[str, Any]:
    buffer = io.BytesIO()
    image.save(buffer, format="jpeg" if image_format == "jpg" else image_format)
    sample = {"__key__": f"s{index:07d}", image_format: buffer.getvalue()}
    if dataset_type == RETRIEVAL:
        captions = [target] if isinstance(target, str) else list(target)
        sample["txt"] = "\n".join(captions).encode("utf-8")
    elif isinstance(target, numbers.Integral):
        sample["cls"] = str(int(target)).encode("utf-8")
    else:
        raise ValueError(f"sample {index}: a class index must be an integer, got {target!r}")
    return sample


def _read_dataset_type(root: Path) -> str:
    path = root / DATASET_TYPE_FILE
    if not path.exists():
        return CLASSIFICATION
    dataset_type = path.read_text(encoding="utf-8").strip().lower()
    if dataset_type not in DATASET_TYPES:
        raise ValueError(
            f"{path} says {dataset_type!r}; supported dataset types are {', '.join(DATASET_TYPES)}"
        )
    return dataset_type


def _shard_paths(root: Path, split: str) -> list[Path]:
    nshards_path = root / split / NSHARDS_FILE
    if not nshards_path.is_file():
        raise ValueError(f"benchmark root {root} has no {split}/{NSHARDS_FILE}")
    text = nshards_path.read_text(encoding="utf-8").strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{nshards_path} must hold a positive number of shards, got {text!r}")
    paths = [root / split / f"{i}.tar" for i in range(int(text))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{nshards_path} lists {len(paths)} shards but {missing} are missing")
    return paths


def _metadata_file(root: Path, name: str, override: str | Path | None, what: str) -> Path:
    path = Path(override) if override is not None else root / name
    if not path.is_file():
        hint = "" if override is not None else f" (or pass {what}_file=...)"
        raise ValueError(f"{what} file {path} not found{hint}")
    return path


@dataclass(frozen=True)
class _SampleDecoder:
    """Raw tar members of one sample → (image tensor, class index or captions)."""

    preprocess: Callable[[Image.Image], torch.Tensor]
    dataset_type: str
    num_classes: int

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int | list[str]]:
        where = f"sample {sample['__key__']!r} in {sample['__url__']}"
        extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if extension is None:
            raise ValueError(f"{where} has no image member (looked for {IMAGE_EXTENSIONS})")
        image = self.preprocess(_decode_image(sample[extension], where))
        if self.dataset_type == RETRIEVAL:
            return image, _captions(sample, where)
        return image, self._class_index(sample, where)

    def _class_index(self, sample: dict[str, Any], where: str) -> int:
        if "cls" not in sample:
            raise ValueError(f"{where} has no 'cls' member (class index)")
        text = sample["cls"].decode("utf-8").strip()
        try:
            index = int(text)
        except ValueError:
            raise ValueError(f"{where}: 'cls' is {text!r}, not an integer") from None
        if not 0 <= index < self.num_classes:
            raise ValueError(
                f"{where}: class index {index} is outside the {self.num_classes} class names"
            )
        return index


def _decode_image(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"{where}: cannot decode image ({err})") from err


def _captions(sample: dict[str, Any], where: str) -> list[str]:
    if "txt" not in sample:
        raise ValueError(f"{where} has no 'txt' member (captions)")
    return sample["txt"].decode("utf-8").splitlines()


def _collate_classes(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = zip(*samples, strict=True)
    return torch.stack(images), torch.tensor(targets, dtype=torch.long)


def _collate_captions(
    samples: list[tuple[torch.Tensor, list[str]]],
) -> tuple[torch.Tensor, list[list[str]]]:
    images, captions = zip(*samples, strict=True)
    return torch.stack(images), list(captions)
