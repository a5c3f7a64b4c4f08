"""COCO captions and Flickr30k (Karpathy splits) → training shards and CLIP_benchmark retrieval.

Input: the Karpathy split file (`dataset_coco.json` or `dataset_flickr30k.json`: `images` with
`filename`, `split` train|restval|val|test, `sentences[].raw`, and for COCO `filepath`
train2014|val2014) and the folder holding the images (COCO: the folder with `train2014/` and
`val2014/`; Flickr30k: `flickr30k-images/`).

    vlp data karpathy --karpathy dataset_coco.json --images /data/coco \\
        --out /data/coco-vlp [--train-splits train,restval] [--pairs all|first]

Writes `OUT/train/shard-*.tar` (+ stats.json; one sample per image–caption pair with
`--pairs all`, the default) and the retrieval sets `OUT/retrieval_{val,test}/` (an image with
all its captions), ready for `vlp train data.shards=...` and `vlp eval --task retrieval`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_tools.common import write_retrieval
from vlp.data.shards_build import Record, write_shards


def read_karpathy(path: str | Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    if "images" not in data:
        raise ValueError(f"{path}: not a Karpathy split file (no 'images' list)")
    return data["images"]


def image_path(entry: dict, images: Path) -> Path:
    return images / entry.get("filepath", "") / entry["filename"]


def captions_of(entry: dict) -> list[str]:
    return [s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()]


def convert(karpathy: str | Path, images: str | Path, out: str | Path, *,
            train_splits: tuple[str, ...] = ("train", "restval"), pairs: str = "all",
            samples_per_shard: int = 10_000, workers: int | None = None,
            progress: bool = True) -> dict:
    entries, images, out = read_karpathy(karpathy), Path(images), Path(out)
    records = []
    for entry in entries:
        if entry["split"] not in train_splits:
            continue
        captions = captions_of(entry)
        for caption in captions if pairs == "all" else captions[:1]:
            meta = {"split": entry["split"], "image_id": entry.get("cocoid", entry.get("imgid"))}
            records.append(Record(str(image_path(entry, images)), caption,
                                  str(Path(entry.get("filepath", "")) / entry["filename"]), meta))
    report = {"train": write_shards(records, out / "train", samples_per_shard=samples_per_shard,
                                    workers=workers, progress=progress)["num_samples"]}
    for split in ("val", "test"):
        items = [(image_path(e, images), captions_of(e)) for e in entries if e["split"] == split]
        if items:
            report[f"retrieval_{split}"] = write_retrieval(out / f"retrieval_{split}", items)
    return report


def main(argv: list[str], prog: str) -> int:
    """The command line (`vlp data NAME ...`); see `data_tools.run`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--karpathy", required=True, help="dataset_coco.json / dataset_flickr30k.json")
    parser.add_argument("--images", required=True, help="image root")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-splits", default="train,restval")
    parser.add_argument("--pairs", choices=("all", "first"), default="all")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    report = convert(args.karpathy, args.images, args.out,
                     train_splits=tuple(args.train_splits.split(",")), pairs=args.pairs,
                     samples_per_shard=args.samples_per_shard, workers=args.workers)
    print(json.dumps(report, indent=1))
    return 0

