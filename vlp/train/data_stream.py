"""The training data stream of a run: built from `cfg.data`, resumed from the trainer state.

The trainer state's `data` field holds this rank's stream positions (`DataPosition`); a
checkpoint's `trainer_state.json` holds every rank's under `data.ranks`, with the topology and
the source they belong to. A resumed run with the same ranks × workers and data continues each
stream at the exact sample where it stopped; with a different topology the positions do not
map onto the new streams, so it starts fresh streams seeded with the step (a warning says so).
"""

from __future__ import annotations

import logging
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from vlp.config import ConfigError, DataConfig
from vlp.data.limits import SampleLimits
from vlp.data.pipeline import DataPosition, build_train_loader
from vlp.data.sources import HFSource, ShardSource, load_hf_dataset

log = logging.getLogger(__name__)


def build_source(data: DataConfig, train_shards: str, *, seed: int) -> ShardSource | HFSource:
    """The configured source: `data.hf` (a Hugging Face dataset) or webdataset shards."""
    try:
        if data.hf is not None:
            dataset = load_hf_dataset(data.hf.path, data.hf.split, streaming=data.hf.streaming)
            return HFSource(dataset, image_column=data.hf.image_column,
                            text_column=data.hf.text_column, mode=data.mode, seed=seed,
                            shuffle_buffer=data.shuffle_buffer, name=data.hf.path)
        return ShardSource(train_shards, mode=data.mode, weights=data.shard_weights, seed=seed,
                           shuffle_buffer=data.shuffle_buffer)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def source_id(data: DataConfig) -> str:
    """What a saved position belongs to: positions of other data do not apply."""
    what = data.shards or data.hf or data.synth
    return f"{data.mode}|{data.shard_weights}|{data.shuffle_buffer}|{what}"


def build_batches(cfg, train_shards: str, bundle, accelerator: Accelerator,
                  state) -> tuple[DataLoader, DataPosition]:
    """This rank's DataLoader, started where `state.data` says, and the tracker of its position."""
    data = cfg.data
    seed = cfg.train.seed
    start = None
    if state.data:
        start = DataPosition.start_from(state.data)
    elif state.step > 0:  # resumed, but no usable data position: new samples, not the first ones
        seed = cfg.train.seed * 100_003 + state.step
    source = build_source(data, train_shards, seed=seed)
    try:
        loader = build_train_loader(
            source, preprocess=bundle.preprocess_train, tokenizer=bundle.tokenizer,
            batch_size=data.batch_size, num_workers=data.num_workers, seed=seed,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
            num_negatives=data.num_negatives, start=start,
            captions=data.captions, num_positives=data.num_positives,
            limits=SampleLimits(max_caption_chars=data.max_caption_chars,
                                max_image_pixels=data.max_image_pixels),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return loader, DataPosition(data.num_workers, start)


def gather_data_position(cfg, accelerator: Accelerator,
                         local: dict[str, Any]) -> dict[str, Any]:
    """Every rank's position (a collective: call it on all ranks)."""
    ranks = gather_object([local]) if accelerator.num_processes > 1 else [local]
    return {"world_size": accelerator.num_processes,
            "num_workers": max(cfg.data.num_workers, 1),
            "source": source_id(cfg.data), "ranks": ranks}


def rank_data_position(cfg, accelerator: Accelerator,
                       saved: dict[str, Any] | None) -> dict[str, Any]:
    """This rank's saved position, or {} when the checkpoint's streams are not this run's."""
    if not saved or "ranks" not in saved:
        return {}
    same = (saved.get("world_size") == accelerator.num_processes
            and saved.get("num_workers") == max(cfg.data.num_workers, 1)
            and saved.get("source") == source_id(cfg.data))
    if not same:
        accelerator.print(
            "warning: the checkpoint's data position was saved with "
            f"{saved.get('world_size')} ranks x {saved.get('num_workers')} workers over "
            f"{saved.get('source')!r}; this run differs, so it starts new streams (seeded with "
            "the step) instead of continuing the old ones")
        return {}
    return saved["ranks"][accelerator.process_index]
