"""Streaming image–text batches from webdataset shards.

Shards are drawn with replacement (resampled mode, as open_clip does for large runs), seeded per
(seed, rank, worker), so every rank and worker reads its own stream and no rank can run out of
data before another. Undecodable samples (bad image bytes, missing or empty caption, a truncated
tar member) are skipped, logged with their shard and key, and counted; each batch carries its
worker's running count so the trainer can report it.

Batch (DESIGN §3): `image` (B,3,H,W) float, `text` (B,L) token ids, `key` list of sample ids,
`neg_text` (B,K,L) when K = `num_negatives` > 0 (hard-negative captions drawn from the sample
json's `neg_captions`), plus `worker` and `skipped` (the worker's cumulative skip count).
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(spec: str) -> list[str]:
    """`a/{000..009}.tar::b/x.tar` → the list of shard URLs (brace expansion, `::` joins)."""
    return wds.shardlists.expand_urls(spec)


@dataclass
class SkipCounter:
    """Per-worker count of samples that could not be used."""

    skipped: int = 0

    def skip(self, reason: str, sample: dict[str, Any] | None = None) -> None:
        self.skipped += 1
        where = ""
        if sample is not None:
            where = f" (shard {sample.get('__url__', '?')}, key {sample.get('__key__', '?')})"
        log.warning("skipping sample%s: %s", where, reason)


def pick_negatives(sample: dict[str, Any], num_negatives: int, rng: random.Random) -> list[str]:
    """`num_negatives` of the sample's `neg_captions` (without replacement when there are enough)."""
    if "json" not in sample:
        raise ValueError("no json member (hard negatives live under 'neg_captions')")
    try:
        negatives = json.loads(sample["json"]).get("neg_captions") or []
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"json member is not a JSON object: {e}") from None
    negatives = [n for n in negatives if isinstance(n, str) and n.strip()]
    if not negatives:
        raise ValueError("json has no 'neg_captions'")
    if len(negatives) >= num_negatives:
        return rng.sample(negatives, num_negatives)
    return rng.choices(negatives, k=num_negatives)


def decode_sample(
    sample: dict[str, Any],
    preprocess: Callable,
    tokenizer: Callable,
    *,
    num_negatives: int = 0,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """Raw tar members → image tensor and token ids; raises ValueError naming what is wrong."""
    image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if image_bytes is None:
        raise ValueError(f"no image member (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if "txt" not in sample:
        raise ValueError("no txt member (caption)")
    caption = sample["txt"].decode("utf-8").strip()
    if not caption:
        raise ValueError("empty caption")
    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            image = img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes
        raise ValueError(f"undecodable image: {e}") from None
    decoded = {"image": preprocess(image), "text": tokenizer([caption])[0], "key": sample["__key__"]}
    if num_negatives:
        decoded["neg_text"] = tokenizer(pick_negatives(sample, num_negatives, rng or random))
    return decoded


class ShardStream(IterableDataset):
    """An endless stream of decoded batches for one rank; each worker reads its own shards."""

    def __init__(
        self,
        urls: list[str],
        *,
        preprocess: Callable,
        tokenizer: Callable,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        num_negatives: int = 0,
    ):
        super().__init__()
        self.num_negatives = num_negatives
        self.urls = urls
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        counter = SkipCounter()
        worker_seed = self.seed * 1_000_003 + self.rank * 1_000 + worker
        rng = random.Random(worker_seed)
        shards = wds.ResampledShards(
            self.urls, seed=worker_seed, worker_seed=lambda: 0, deterministic=True
        )

        def on_tar_error(exn: Exception) -> bool:
            counter.skip(f"unreadable tar data: {exn}")
            return True

        samples = wds.tarfile_to_samples(handler=on_tar_error)(iter(shards))
        if self.shuffle_buffer:
            samples = wds.filters.shuffle(
                bufsize=self.shuffle_buffer, initial=self.shuffle_buffer // 4, seed=worker_seed
            )(samples)
        batch: list[dict[str, Any]] = []
        for sample in samples:
            try:
                batch.append(decode_sample(sample, self.preprocess, self.tokenizer,
                                           num_negatives=self.num_negatives, rng=rng))
            except ValueError as e:
                counter.skip(str(e), sample)
                continue
            if len(batch) == self.batch_size:
                yield collate(batch, worker=worker, skipped=counter.skipped)
                batch = []


def collate(samples: list[dict[str, Any]], *, worker: int, skipped: int) -> dict[str, Any]:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "key": [s["key"] for s in samples],
        "worker": worker,
        "skipped": skipped,
    }
    if "neg_text" in samples[0]:
        batch["neg_text"] = torch.stack([s["neg_text"] for s in samples])
    return batch


def build_train_loader(
    shards: str,
    *,
    preprocess: Callable,
    tokenizer: Callable,
    batch_size: int,
    num_workers: int,
    shuffle_buffer: int,
    seed: int,
    rank: int,
    num_negatives: int = 0,
) -> DataLoader:
    """A DataLoader of endless batches for this rank (resampled shards, per-worker seeds)."""
    dataset = ShardStream(
        expand_shards(shards),
        preprocess=preprocess,
        tokenizer=tokenizer,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=rank,
        num_negatives=num_negatives,
    )
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


class SkippedTotal:
    """Sums the cumulative per-worker skip counts that batches carry."""

    def __init__(self) -> None:
        self.by_worker: dict[int, int] = {}

    def update(self, batch: dict[str, Any]) -> int:
        self.by_worker[batch["worker"]] = batch["skipped"]
        return sum(self.by_worker.values())
