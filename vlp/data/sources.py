"""Where training samples come from: webdataset shards or a Hugging Face dataset.

A source turns `(round, stream)` into a deterministic iterator of raw samples (tar members as
bytes plus `__key__`/`__url__`), so a stream can be replayed, and fast-forwarded on resume,
without decoding anything. A *stream* is one DataLoader worker of one rank; a *round* is one
pass of that stream:

- `epoch` mode: round r is epoch r. The shard list is shuffled with `(seed, r)` (the same order
  on every rank), split by node (rank) and then by worker; each stream reads its shards once.
- `resampled` mode: round r draws `SHARDS_PER_ROUND` shards with replacement, seeded by
  `(seed, stream, r)`; with `weights`, each `::`-separated part of the spec gets that share of
  the draws (then a shard uniformly within the part), without them every shard is equally likely.

Streams never end (round r+1 follows round r), so every rank always has its next batch and DDP
never waits on a rank that ran dry.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from vlp.data.tar_reader import read_shard

MODES = ("resampled", "epoch")
SHARDS_PER_ROUND = 8
"""Shards a resampled stream draws per round; a resume replays at most one round's samples."""


@dataclass(frozen=True)
class Stream:
    """One worker of one rank: which slice of the data it reads."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def global_id(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def total(self) -> int:
        return self.world_size * self.num_workers


def expand_shards(spec: str) -> list[str]:
    """`a/{000..009}.tar::b/x.tar` → the list of shard URLs (brace expansion, `::` joins)."""
    return wds.shardlists.expand_urls(spec)


def pipe_commands(spec: str | None) -> list[str]:
    """The shell commands a shard spec runs: its `pipe:` parts, before brace expansion."""
    return [part.removeprefix("pipe:") for part in (spec or "").split("::")
            if part.startswith("pipe:")]


def announce_pipe_commands(spec: str | None) -> None:
    """Print, once per run (global rank 0) and before it starts, each shell command that
    `pipe:` shards run: a recipe's `pipe:` spec executes whatever it names."""
    if os.environ.get("RANK", "0") != "0":
        return
    for command in pipe_commands(spec):
        print(f"data.shards: reading shards through the shell command: {command}",
              file=sys.stderr)


def split_spec(spec: str) -> list[list[str]]:
    """The `::`-separated parts of a shard spec, each brace-expanded (a mixture's sources)."""
    return [wds.shardlists.expand_urls(part) for part in spec.split("::") if part]


def shuffle_buffer(samples: Iterator[dict], size: int, seed: str) -> Iterator[dict]:
    if not size:
        return samples
    return wds.filters.shuffle(bufsize=size, initial=max(1, size // 4), seed=seed)(samples)


class ShardSource:
    """webdataset shards: local paths, or any URL/`pipe:` command webdataset opens."""

    def __init__(self, spec: str, *, mode: str = "resampled", weights: list[float] | None = None,
                 seed: int = 0, shuffle_buffer: int = 0):
        if mode not in MODES:
            raise ValueError(f"data.mode: unknown {mode!r}; known: {', '.join(MODES)}")
        self.parts = split_spec(spec)
        self.urls = [url for part in self.parts for url in part]
        if not self.urls:
            raise ValueError(f"data.shards: {spec!r} names no shard")
        if weights is not None:
            if mode != "resampled":
                raise ValueError("data.shard_weights needs data.mode: resampled (an epoch reads "
                                 "every shard exactly once)")
            if len(weights) != len(self.parts) or any(w < 0 for w in weights) or not sum(weights):
                raise ValueError(
                    f"data.shard_weights: need {len(self.parts)} non-negative weights, one per "
                    f"'::'-separated part of data.shards, not all zero; got {weights}")
        self.mode, self.weights, self.seed = mode, weights, seed
        self.shuffle_buffer = shuffle_buffer

    def check_streams(self, world_size: int, num_workers: int) -> None:
        """Epoch mode gives each stream whole shards: there must be one per stream at least."""
        streams = world_size * max(num_workers, 1)
        if self.mode == "epoch" and len(self.urls) < streams:
            raise ValueError(
                f"data.mode: epoch needs at least one shard per worker: {len(self.urls)} shards "
                f"< {world_size} ranks x {max(num_workers, 1)} workers. Write smaller shards "
                "(vlp shards build --samples-per-shard), lower data.num_workers, or use "
                "data.mode: resampled")

    def shards(self, round_: int, stream: Stream) -> list[str]:
        if self.mode == "epoch":
            order = list(self.urls)
            random.Random(f"{self.seed}/epoch/{round_}").shuffle(order)
            return order[stream.rank::stream.world_size][stream.worker::stream.num_workers]
        rng = random.Random(f"{self.seed}/resampled/{stream.global_id}/{round_}")
        if self.weights is None:
            return rng.choices(self.urls, k=SHARDS_PER_ROUND)
        parts = rng.choices(self.parts, weights=self.weights, k=SHARDS_PER_ROUND)
        return [rng.choice(part) for part in parts]

    def samples(self, round_: int, stream: Stream,
                on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        samples = (sample for url in self.shards(round_, stream)
                   for sample in read_shard(url, on_error))
        return shuffle_buffer(samples, self.shuffle_buffer,
                              f"{self.seed}/shuffle/{stream.global_id}/{round_}")

    def describe(self) -> str:
        return f"{len(self.urls)} shards ({self.mode})"


def load_hf_dataset(path: str, split: str | None = None, streaming: bool = False):
    """A `save_to_disk` folder (`load_from_disk`), or anything `datasets.load_dataset` reads
    locally (a data folder, an imagefolder, parquet files)."""
    import datasets

    folder = Path(path).expanduser()
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split is None or split not in loaded:
                raise ValueError(f"data.hf.split: {path} has splits {sorted(loaded)}; "
                                 f"got {split!r}")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    return datasets.load_dataset(str(folder) if folder.exists() else path, split=split or "train",
                                 streaming=streaming)


def _image_bytes(value: Any, where: str) -> bytes:
    """An `Image(decode=False)` cell ({bytes, path}), raw bytes, or a local file path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and Path(value).is_file():
        return Path(value).read_bytes()
    raise ValueError(f"{where}: image cell is neither bytes nor a readable file: {value!r:.80}")


class HFSource:
    """A Hugging Face `Dataset` (map-style: indices shuffled per round like shards) or
    `IterableDataset` (split by stream with `split_dataset_by_node`, shuffled per round)."""

    def __init__(self, dataset, *, image_column: str = "image", text_column: str = "text",
                 mode: str = "resampled", seed: int = 0, shuffle_buffer: int = 1000,
                 name: str = "hf"):
        import datasets

        if mode not in MODES:
            raise ValueError(f"data.mode: unknown {mode!r}; known: {', '.join(MODES)}")
        columns = dataset.column_names
        if columns is not None:
            for key, column in (("image_column", image_column), ("text_column", text_column)):
                if column not in columns:
                    raise ValueError(f"data.hf.{key}: {name} has no column {column!r}; "
                                     f"columns: {columns}")
        features = dataset.features or {}
        if isinstance(features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.iterable = isinstance(dataset, datasets.IterableDataset)
        self.image_column, self.text_column = image_column, text_column
        self.mode, self.seed, self.shuffle_buffer, self.name = mode, seed, shuffle_buffer, name

    def check_streams(self, world_size: int, num_workers: int) -> None:
        streams = world_size * max(num_workers, 1)
        if not self.iterable and len(self.dataset) < streams:
            raise ValueError(f"data.hf: {len(self.dataset)} rows < {streams} workers in all")

    def _indices(self, round_: int, stream: Stream) -> list[int]:
        size = len(self.dataset)
        if self.mode == "epoch":
            order = list(range(size))
            random.Random(f"{self.seed}/epoch/{round_}").shuffle(order)
            return order[stream.rank::stream.world_size][stream.worker::stream.num_workers]
        rng = random.Random(f"{self.seed}/resampled/{stream.global_id}/{round_}")
        return [rng.randrange(size) for _ in range(-(-size // stream.total))]

    def _rows(self, round_: int, stream: Stream) -> Iterator[tuple[str, dict]]:
        if not self.iterable:
            for index in self._indices(round_, stream):
                yield f"{index:09d}", self.dataset[index]
            return
        from datasets.distributed import split_dataset_by_node

        part = split_dataset_by_node(self.dataset, rank=stream.global_id,
                                     world_size=stream.total)
        part = part.shuffle(seed=self.seed + round_, buffer_size=max(self.shuffle_buffer, 1))
        index = 0
        # `.iter` rather than `iter()`: inside a DataLoader worker the latter splits the data
        # over workers once more by itself
        for rows in part.iter(batch_size=64):
            for image, text in zip(rows[self.image_column], rows[self.text_column], strict=True):
                yield (f"{stream.global_id}-{round_}-{index:09d}",
                       {self.image_column: image, self.text_column: text})
                index += 1

    def samples(self, round_: int, stream: Stream,
                on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        for key, row in self._rows(round_, stream):
            sample: dict[str, Any] = {"__key__": key, "__url__": self.name}
            try:
                sample["jpg"] = _image_bytes(row[self.image_column], f"{self.name} row {key}")
            except ValueError:
                pass  # decode_sample reports the missing image with the key
            text = row[self.text_column]
            if isinstance(text, str):
                sample["txt"] = text.encode()
            yield sample

    def describe(self) -> str:
        size = "streaming" if self.iterable else f"{len(self.dataset)} rows"
        return f"Hugging Face dataset {self.name} ({size}, {self.mode})"
