"""Batched embedding of caption lists and image files, each distinct input encoded once.

Compositionality benchmarks reuse inputs heavily (SugarCrepe scores one COCO image in several
subsets; ARO-Order repeats words across five options), so both helpers deduplicate before
encoding and hand back a lookup by the original inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlp.eval.benchmark_data import Benchmark, count_samples, iter_batches
from vlp.eval.cache import active_cache
from vlp.eval.zeroshot import (
    Device,
    DualEncoder,
    Preprocess,
    Tokenizer,
    encode_images,
    encode_texts,
    eval_mode,
)
from vlp.stop_signals import ignore_stop_signals

Box = tuple[float, float, float, float]
"""`(x, y, w, h)` in pixels, ARO's `bbox_x, bbox_y, bbox_w, bbox_h`."""


@dataclass(frozen=True)
class ImageRef:
    """An image file, optionally cropped to a box before preprocessing."""

    path: Path
    box: Box | None = None


class TextEmbeddings:
    """Normalised embeddings of distinct texts, looked up by text."""

    def __init__(self, texts: list[str], features: torch.Tensor):
        self.features = features
        """(U, D) float32 on the CPU, one row per distinct text."""
        self.row = {text: i for i, text in enumerate(texts)}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) embeddings of `texts`, in order."""
        return self.features[torch.tensor([self.row[t] for t in texts], dtype=torch.long)]


def embed_texts(
    model: DualEncoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    device: Device,
    batch_size: int,
    progress: bool = False,
    desc: str = "texts",
) -> TextEmbeddings:
    """Encode each distinct text of `texts` once, in batches of `batch_size`."""
    unique = sorted(dict.fromkeys(texts), key=len)  # similar lengths batch together
    chunks = []
    with eval_mode(model), tqdm(total=len(unique), desc=desc, unit="text",
                                disable=not progress) as bar:
        for start in range(0, len(unique), batch_size):
            batch = unique[start: start + batch_size]
            chunks.append(encode_texts(model, tokenizer, batch, device=device).cpu())
            bar.update(len(batch))
    features = torch.cat(chunks) if chunks else torch.empty(0, 0)
    return TextEmbeddings(unique, features)


def root_embeddings(
    model: DualEncoder,
    preprocess: Preprocess,
    benchmark: Benchmark,
    *,
    device: Device,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "images",
) -> tuple[torch.Tensor, list[Any]]:
    """`(features, labels)`: (N, D) normalised CPU embeddings of a benchmark root's images in
    shard order, and each image's label (its list of captions, or its class index). Inside a
    suite run the root is read and encoded once, whichever benchmarks use it."""
    cache = active_cache()
    key = ("root", str(benchmark.root.resolve()), benchmark.split, id(preprocess))
    if cache is not None and key in cache.roots:
        cache.hits["roots"] += 1
        return cache.roots[key]
    features, labels = [], []
    batches = iter_batches(benchmark, preprocess, batch_size=batch_size, num_workers=num_workers)
    with eval_mode(model), tqdm(total=count_samples(benchmark), desc=desc, unit="image",
                                disable=not progress) as bar:
        for images, targets in batches:
            features.append(encode_images(model, images, device=device).cpu())
            labels += targets.tolist() if isinstance(targets, torch.Tensor) else list(targets)
            bar.update(len(images))
    result = (torch.cat(features), labels)
    if cache is not None:
        cache.roots[key] = result
    return result


def embed_images(
    model: DualEncoder,
    preprocess: Preprocess,
    refs: Sequence[ImageRef],
    *,
    device: Device,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "images",
) -> torch.Tensor:
    """(len(refs), D) normalised embeddings of image files (each distinct file and box once),
    decoded, cropped and preprocessed by `num_workers` DataLoader workers."""
    cache = active_cache()

    def encode(unique: list[ImageRef]) -> torch.Tensor:
        loader = DataLoader(_ImageFiles(unique, preprocess), batch_size=batch_size,
                            shuffle=False, num_workers=num_workers,
                            worker_init_fn=ignore_stop_signals)
        chunks = []
        with eval_mode(model), tqdm(total=len(unique), desc=desc, unit="image",
                                    disable=not progress) as bar:
            for images in loader:
                chunks.append(encode_images(model, images, device=device).cpu())
                bar.update(len(images))
        return torch.cat(chunks)

    if cache is not None:
        keys = [("file", ref, id(preprocess)) for ref in refs]
        return cache.lookup_images(keys, lambda missing: encode([k[1] for k in missing]))
    unique = list(dict.fromkeys(refs))
    row = {ref: i for i, ref in enumerate(unique)}
    return encode(unique)[torch.tensor([row[r] for r in refs], dtype=torch.long)]


def load_image(ref: ImageRef) -> Image.Image:
    """The RGB image of `ref`, cropped to its box as ARO does (`PIL.Image.crop((x, y, x + w,
    y + h))`); a bad file raises a ValueError naming it."""
    try:
        with Image.open(ref.path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {ref.path}: {err}") from None
    if ref.box is not None:
        x, y, w, h = ref.box
        image = image.crop((x, y, x + w, y + h))
    return image


class _ImageFiles(Dataset):
    def __init__(self, refs: list[ImageRef], preprocess: Preprocess):
        self.refs = refs
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(load_image(self.refs[index]))
