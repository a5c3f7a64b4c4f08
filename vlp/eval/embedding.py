"""Batched embedding of caption lists and image files, each distinct input encoded once.

Compositionality benchmarks reuse inputs heavily (SugarCrepe scores one COCO image in several
subsets; ARO-Order repeats words across five options), so both helpers deduplicate before
encoding and hand back a lookup by the original inputs. Images are read, decoded and
preprocessed once per transform while they fit in `vlp.eval.cache`'s decoded-image cache: a
suite run again in the same process reads none.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlp.eval.benchmark_data import Benchmark, Target, count_samples, iter_batches
from vlp.eval.cache import DecodedImages, active_cache, decoded_images, file_source
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
    batches, total = _root_batches(benchmark, preprocess, batch_size=batch_size,
                                   num_workers=num_workers)
    with eval_mode(model), tqdm(total=total, desc=desc, unit="image",
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
        chunks = []
        with eval_mode(model), tqdm(total=len(unique), desc=desc, unit="image",
                                    disable=not progress) as bar:
            for images in _file_batches(unique, preprocess, batch_size=batch_size,
                                        num_workers=num_workers):
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


def _root_batches(benchmark: Benchmark, preprocess: Preprocess, *, batch_size: int,
                  num_workers: int) -> tuple[Iterator[tuple[torch.Tensor, Target]], int | None]:
    """`(batches, count)`: a root's preprocessed `(images, targets)` batches in shard order and
    how many images they hold. They come from the decoded-image cache when it holds the root
    (its shards unchanged), else from the shards, and are then kept if they fit."""
    store = decoded_images(preprocess)
    key = _source_key("root", *benchmark.shard_paths)
    if store is None or key is None:
        return (iter_batches(benchmark, preprocess, batch_size=batch_size,
                             num_workers=num_workers), count_samples(benchmark))
    kept = store.get(key)
    if kept is not None:
        return _rebatched(kept, batch_size), sum(len(images) for images in kept[0])
    batches = iter_batches(benchmark, preprocess, batch_size=batch_size, num_workers=num_workers)
    return _keeping(batches, store, key), count_samples(benchmark)


def _rebatched(kept: tuple[list[torch.Tensor], list[Target]], batch_size: int
               ) -> Iterator[tuple[torch.Tensor, Target]]:
    """The kept batches as they were read (split if larger than `batch_size`)."""
    for images, targets in zip(*kept, strict=True):
        for start in range(0, len(images), batch_size):
            yield images[start: start + batch_size], targets[start: start + batch_size]


def _keeping(batches: Iterator[tuple[torch.Tensor, Target]], store: DecodedImages,
             key: Hashable) -> Iterator[tuple[torch.Tensor, Target]]:
    """`batches`, passed on; kept in `store` under `key` once read to the end, unless they
    outgrow the room left in the cache (then nothing is kept)."""
    images_kept: list[torch.Tensor] | None = []
    targets_kept: list[Target] = []
    room, nbytes = store.room(), 0
    for images, targets in batches:
        if images_kept is not None:
            nbytes += images.nbytes
            if nbytes > room:
                images_kept = targets_kept = None
            else:
                # their own memory, not a loader worker's shared buffers
                images_kept.append(images.clone())
                targets_kept.append(targets.clone() if isinstance(targets, torch.Tensor)
                                    else targets)
        yield images, targets
    if images_kept is not None:
        store.add(key, (images_kept, targets_kept), nbytes)


def _file_batches(refs: list[ImageRef], preprocess: Preprocess, *, batch_size: int,
                  num_workers: int) -> Iterator[torch.Tensor]:
    """Preprocessed images of `refs` in batches: those in the decoded-image cache from there,
    the others read by `num_workers` DataLoader workers and kept while they fit."""
    store = decoded_images(preprocess)
    keys = [_source_key("file", ref.path, box=ref.box) if store is not None else None
            for ref in refs]
    kept = [store.get(key) if store is not None and key is not None else None for key in keys]
    if all(image is not None for image in kept):
        for start in range(0, len(kept), batch_size):
            yield torch.stack(kept[start: start + batch_size])
        return
    loader = DataLoader(_ImageFiles(refs, preprocess, kept), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers,
                        worker_init_fn=ignore_stop_signals)
    start = 0
    for images in loader:
        if store is not None:
            for index, image in enumerate(images, start):
                if kept[index] is None and keys[index] is not None:
                    store.add(keys[index], image.clone(), image.nbytes)
        start += len(images)
        yield images


def _source_key(kind: str, *paths: Path, box: Box | None = None) -> Hashable | None:
    """Identity of images read from `paths` (each file's path, size and modification time), or
    None if a file cannot be looked at (reading it will then say what is wrong)."""
    try:
        return (kind, *(file_source(path) for path in paths), box)
    except OSError:
        return None


class _ImageFiles(Dataset):
    """Preprocessed images of `refs`; an image given in `kept` is not read again."""

    def __init__(self, refs: list[ImageRef], preprocess: Preprocess,
                 kept: list[torch.Tensor | None] | None = None):
        self.refs = refs
        self.preprocess = preprocess
        self.kept = kept or [None] * len(refs)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.kept[index]
        if image is not None:
            return image
        return self.preprocess(load_image(self.refs[index]))
