"""Data pipeline throughput: vlp's streaming loader vs open_clip_train's `get_wds_dataset`.

    python benchmarks/data_throughput.py [--num-samples 4000] [--image-size 256] [--model ViT-B-32]
        [--batch-size 64] [--batches 40] [--warmup 5] [--workers 1] [--repeats 3] [--out FILE]

Both loaders read the same shards (JPEG images of `--image-size` px with captions, written once
by `vlp.data.shards_build` into `--work-dir`) in resampled mode with the same shuffle buffer,
and do the same work per sample: decode the JPEG, open_clip's training transform for `--model`
(random resized crop to its input size, normalise) and its tokenizer. samples/s per worker is
measured over `--batches` batches after `--warmup`, with `--workers` DataLoader workers; runs
alternate between the loaders and the table gives the median and every run. open_clip's tar
reader is patched for webdataset >= 0.2.96 (`eof_value=None`, open_clip#935), as in
`train_throughput.py`.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
from PIL import Image, ImageDraw

SHUFFLE = 5000  # open_clip_train's _SAMPLE_SHUFFLE_SIZE


def make_shards(work_dir: Path, num_samples: int, image_size: int) -> str:
    """Photo-like JPEGs (noise + shapes) with captions; reused when already there."""
    from vlp.data.shards_build import Record, write_shards

    out = work_dir / f"shards-{num_samples}-{image_size}"
    stats = out / "stats.json"
    if not stats.is_file():
        rng = np.random.default_rng(0)
        images = work_dir / f"images-{image_size}"
        images.mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(num_samples):
            path = images / f"{i:06d}.jpg"
            if not path.is_file():
                noise = rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
                img = Image.fromarray(noise).resize((image_size, image_size))
                draw = ImageDraw.Draw(img)
                for _ in range(3):
                    x, y = rng.integers(0, image_size - 20, 2)
                    draw.ellipse([x, y, x + 40, y + 30], fill=tuple(rng.integers(0, 255, 3)))
                img.save(path, quality=90)
            records.append(Record(str(path), f"a photo of object {i % 97} on a textured "
                                  f"background number {i}", path.name))
        write_shards(records, out, samples_per_shard=max(num_samples // 16, 1), progress=False)
    import json

    return json.loads(stats.read_text())["spec"]


def vlp_loader(spec: str, args, preprocess, tokenizer):
    from vlp.data.pipeline import build_train_loader

    return build_train_loader(spec, preprocess=preprocess, tokenizer=tokenizer,
                              batch_size=args.batch_size, num_workers=args.workers,
                              shuffle_buffer=SHUFFLE, seed=0)


def open_clip_loader(spec: str, args, preprocess, tokenizer):
    import open_clip_train.data as oc_data
    import webdataset.tariterators as tariterators

    oc_data.tar_file_expander = functools.partial(tariterators.tar_file_expander, eof_value=None)
    oc_args = SimpleNamespace(
        train_data=spec, val_data=None, dataset_resampled=True, train_num_samples=10**9,
        train_data_upsampling_factors=None, seed=0, batch_size=args.batch_size, world_size=1,
        workers=args.workers)
    info = oc_data.get_wds_dataset(oc_args, preprocess, is_train=True, epoch=0,
                                   tokenizer=tokenizer)
    return info.dataloader


LOADERS = {"vlp": vlp_loader, "open_clip": open_clip_loader}


def measure(name: str, spec: str, args, preprocess, tokenizer) -> float:
    """samples/s per worker after the warmup batches."""
    batches = iter(LOADERS[name](spec, args, preprocess, tokenizer))
    for _ in range(args.warmup):
        next(batches)
    start = time.perf_counter()
    samples = 0
    for _ in range(args.batches):
        batch = next(batches)
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        samples += len(images)
    elapsed = time.perf_counter() - start
    del batches  # stops the workers
    return samples / elapsed / max(args.workers, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/vlp/data_throughput"))
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)

    spec = make_shards(Path(args.work_dir), args.num_samples, args.image_size)
    size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
    preprocess = open_clip.image_transform(size, is_train=True)
    tokenizer = open_clip.get_tokenizer(args.model)
    runs: dict[str, list[float]] = {name: [] for name in LOADERS}
    for _ in range(args.repeats):
        for name in LOADERS:
            runs[name].append(measure(name, spec, args, preprocess, tokenizer))
    median = {name: statistics.median(values) for name, values in runs.items()}
    lines = [
        f"{args.num_samples} JPEGs of {args.image_size} px -> {args.model} train transform "
        f"({size} px) + tokenizer; batch {args.batch_size}, {args.workers} worker(s), "
        f"{args.batches} batches after {args.warmup} warmup, {args.repeats} runs each",
        "",
        "| loader | samples/s per worker (median) | ratio vs open_clip | runs |",
        "|---|---:|---:|---|",
    ]
    for name in LOADERS:
        lines.append(f"| {name} | {median[name]:.1f} | {median[name] / median['open_clip']:.2f}x "
                     f"| {', '.join(f'{v:.1f}' for v in runs[name])} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
