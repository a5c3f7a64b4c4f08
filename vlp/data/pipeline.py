"""Streaming image–text batches from webdataset shards or a Hugging Face dataset.

Each rank's DataLoader workers read their own deterministic, endless streams (`vlp.data.sources`:
epoch mode splits a per-epoch shuffled shard list by rank then worker; resampled mode draws
shards with replacement, optionally as a weighted mixture), so no rank can run out of data
before another. Undecodable samples (bad image bytes, missing or empty caption, a truncated tar
member) are skipped, logged with their shard and key, and counted; each batch carries its
worker's running count so the trainer can report it, and its stream position so a resumed run
continues exactly where the last one stopped.

Batch (docs/design.md §3): `image` (B,3,H,W) float, `text` (B,L) token ids, `key` list of sample ids,
`neg_text` (B,K,L) when K = `num_negatives` > 0 (hard-negative captions drawn from the sample
json's `neg_captions`), `pos_text` (B,K,L) and `pos_mask` (B,K) bool when `captions` is `all`
(K = `num_positives` true captions per image, `text`'s first, padding repeats and is masked
False; `vlp.data.captions`), plus `worker`, `skipped` (the worker's cumulative skip count) and
`position` ((round, offset) of the worker's stream after this batch; see `StreamPosition`).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.captions import choose_positives
from vlp.data.limits import DEFAULT_LIMITS, SampleLimits, read_caption, read_image
from vlp.data.sources import HFSource, ShardSource, Stream
from vlp.data.sources import expand_shards as expand_shards  # re-exported
from vlp.data.tar_reader import DAMAGE, IMAGE_EXTENSIONS
from vlp.stop_signals import ignore_stop_signals

log = logging.getLogger(__name__)



class DataError(RuntimeError):
    """The data cannot feed training (e.g. no usable sample); its message is one line."""

    def __str__(self) -> str:
        # Raised in a DataLoader worker, it arrives re-raised with the worker's traceback in
        # its message; the last line is the original message.
        text = super().__str__().rstrip()
        last = text.splitlines()[-1] if text else text
        return last.removeprefix(f"{type(self).__module__}.{type(self).__qualname__}: ")


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


def hard_negatives(sample: dict[str, Any]) -> list[str]:
    """The sample's usable hard-negative captions (the json's non-empty `neg_captions`)."""
    if "json" not in sample:
        raise ValueError("no json member (hard negatives live under 'neg_captions')")
    try:
        negatives = json.loads(sample["json"]).get("neg_captions") or []
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"json member is not a JSON object: {e}") from None
    negatives = [n for n in negatives if isinstance(n, str) and n.strip()]
    if not negatives:
        raise ValueError("json has no 'neg_captions'")
    return negatives


def pick_negatives(sample: dict[str, Any], num_negatives: int, rng: random.Random) -> list[str]:
    """`num_negatives` of the sample's `neg_captions` (without replacement when there are
    enough, else some repeat)."""
    negatives = hard_negatives(sample)
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
    limits: SampleLimits = DEFAULT_LIMITS,
    captions: str = "first",
    num_positives: int = 0,
) -> dict[str, Any]:
    """Raw tar members → image tensor and token ids; raises ValueError naming what is wrong
    (including a caption or image over `limits`, malformed json `captions`, and damage the tar
    reader found). `captions`/`num_positives`: which true captions it carries
    (`vlp.data.captions`)."""
    if DAMAGE in sample:
        raise ValueError(sample[DAMAGE])
    image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if image_bytes is None:
        raise ValueError(f"no image member (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if "txt" not in sample:
        raise ValueError("no txt member (caption)")
    rng = rng or random
    caption, image = read_caption(sample["txt"], limits), read_image(image_bytes, limits)
    chosen = choose_positives(captions, caption, sample, rng=rng, num_positives=num_positives,
                              limits=limits)
    decoded = {"image": preprocess(image), "text": tokenizer([chosen["text"]])[0],
               "key": sample["__key__"]}
    if "positives" in chosen:
        decoded["pos_text"] = tokenizer(chosen["positives"])
        decoded["pos_mask"] = torch.tensor(chosen["mask"])
    if num_negatives:
        decoded["neg_text"] = tokenizer(pick_negatives(sample, num_negatives, rng))
    return decoded


MAX_EMPTY_ROUNDS = 3
"""A stream stops with an error after this many rounds in a row without one usable sample."""


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: its round (the epoch, in epoch mode), how many raw samples of
    that round its delivered batches used (decodable or not), and its cumulative skip count."""

    round: int = 0
    offset: int = 0
    skipped: int = 0


@dataclass
class DataStart:
    """Where each of a rank's streams resumes, and which stream the next batch comes from."""

    positions: dict[int, StreamPosition] = field(default_factory=dict)
    next_worker: int = 0


class ShardStream(IterableDataset):
    """An endless stream of decoded batches for one rank; each worker reads its own stream.

    DataLoader worker w serves stream (w + start.next_worker) % num_workers, so that after a
    resume the round-robin order of batches continues where it stopped. A resumed stream skips
    the raw samples it had already delivered without decoding them.
    """

    def __init__(
        self,
        source: ShardSource | HFSource,
        *,
        preprocess: Callable,
        tokenizer: Callable,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_negatives: int = 0,
        start: DataStart | None = None,
        limits: SampleLimits = DEFAULT_LIMITS,
        captions: str = "first",
        num_positives: int = 0,
    ):
        super().__init__()
        self.limits = limits
        self.source = source
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.num_negatives = num_negatives
        self.captions, self.num_positives = captions, num_positives
        self.start = start or DataStart()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        in_worker = info is not None
        num_workers = info.num_workers if info is not None else 1
        worker = ((info.id if info is not None else 0) + self.start.next_worker) % num_workers
        stream = Stream(self.rank, self.world_size, worker, num_workers)
        begin = self.start.positions.get(worker, StreamPosition())
        counter = SkipCounter(begin.skipped)

        def on_tar_error(exn: Exception) -> bool:
            counter.skip(f"unreadable tar data: {exn}")
            return True

        batch: list[dict[str, Any]] = []
        empty_rounds = 0
        for round_ in itertools.count(begin.round):
            skip_to = begin.offset if round_ == begin.round else 0
            decoded_any, index = False, -1
            for index, sample in enumerate(self.source.samples(round_, stream, on_tar_error)):
                if index < skip_to:
                    continue  # delivered before the resume
                sample_seed = hash((self.source.seed, stream.global_id, round_, index))
                if in_worker:  # random augmentations replay exactly after a resume
                    torch.default_generator.manual_seed(sample_seed)  # ~1 us; manual_seed ~170
                draws = self.num_negatives or self.captions != "first"
                rng = random.Random(sample_seed) if draws else None
                try:
                    batch.append(decode_sample(sample, self.preprocess, self.tokenizer,
                                               num_negatives=self.num_negatives, rng=rng,
                                               limits=self.limits, captions=self.captions,
                                               num_positives=self.num_positives))
                except ValueError as e:
                    counter.skip(str(e), sample)
                    continue
                decoded_any = True
                if len(batch) == self.batch_size:
                    yield collate(batch, worker=worker, skipped=counter.skipped,
                                  position=(round_, index + 1))
                    batch = []
            fast_forwarded = 0 <= index < skip_to
            empty_rounds = 0 if decoded_any or fast_forwarded else empty_rounds + 1
            if empty_rounds == MAX_EMPTY_ROUNDS:  # rather than spin for ever
                raise DataError(
                    f"data: stream {stream.global_id} (rank {stream.rank}, worker {worker}) got "
                    f"no usable sample in {MAX_EMPTY_ROUNDS} rounds in a row (up to round "
                    f"{round_}) from {self.source.describe()}: {counter.skipped} skipped so "
                    "far; check the data (vlp shards validate)")


def collate(samples: list[dict[str, Any]], *, worker: int, skipped: int,
            position: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "key": [s["key"] for s in samples],
        "worker": worker,
        "skipped": skipped,
        "position": position,
    }
    for name in ("neg_text", "pos_text", "pos_mask"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


def build_train_loader(
    shards: str | ShardSource | HFSource,
    *,
    preprocess: Callable,
    tokenizer: Callable,
    batch_size: int,
    num_workers: int,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    mode: str = "resampled",
    weights: list[float] | None = None,
    num_negatives: int = 0,
    start: DataStart | None = None,
    limits: SampleLimits = DEFAULT_LIMITS,
    captions: str = "first",
    num_positives: int = 0,
) -> DataLoader:
    """A DataLoader of endless batches for this rank. `shards` is a shard spec (read with
    `mode`, `weights`, `seed`, `shuffle_buffer`) or a ready source; `start` resumes streams."""
    source = shards if not isinstance(shards, str) else ShardSource(
        shards, mode=mode, weights=weights, seed=seed, shuffle_buffer=shuffle_buffer)
    source.check_streams(world_size, num_workers)
    dataset = ShardStream(
        source,
        preprocess=preprocess,
        tokenizer=tokenizer,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_negatives=num_negatives,
        start=start,
        limits=limits,
        captions=captions,
        num_positives=num_positives,
    )
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # workers' seeds come from here, not from the global RNG a resume restores
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals,  # the main process stops them (vlp.stop_signals)
    )


class DataPosition:
    """What the trainer has consumed of one rank's streams: each stream's position after its
    last used batch (batches still in the DataLoader's prefetch queue do not count)."""

    def __init__(self, num_workers: int, start: DataStart | None = None):
        self.num_workers = max(num_workers, 1)
        start = start or DataStart()
        self.positions = dict(start.positions)
        self.next_worker = start.next_worker

    def update(self, batch: dict[str, Any]) -> int:
        """Record a used batch; return the rank's total count of skipped samples."""
        round_, offset = batch["position"]
        self.positions[batch["worker"]] = StreamPosition(round_, offset, batch["skipped"])
        self.next_worker = (batch["worker"] + 1) % self.num_workers
        return sum(p.skipped for p in self.positions.values())

    def state_dict(self) -> dict[str, Any]:
        return {"next_worker": self.next_worker,
                "streams": {str(w): [p.round, p.offset, p.skipped]
                            for w, p in sorted(self.positions.items())}}

    @staticmethod
    def start_from(state: dict[str, Any]) -> DataStart:
        return DataStart({int(w): StreamPosition(*p) for w, p in state["streams"].items()},
                         next_worker=state["next_worker"])


class SkippedTotal:
    """Sums the cumulative per-worker skip counts that batches carry."""

    def __init__(self) -> None:
        self.by_worker: dict[int, int] = {}

    def update(self, batch: dict[str, Any]) -> int:
        self.by_worker[batch["worker"]] = batch["skipped"]
        return sum(self.by_worker.values())
