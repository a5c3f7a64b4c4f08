"""Conceptual Captions (CC3M, CC12M) TSV with images already downloaded → training shards.

The TSVs have no header: CC3M `Train_GCC-training.tsv` is `caption<TAB>url`, CC12M
`cc12m.tsv` is `url<TAB>caption` (`--layout cc3m|cc12m`). Downloaded images are found in
`--images` by row number (`{row:09d}.jpg`, `.png` or `.webp`, as most download scripts name
them, `--name-by row`) or by the SHA-1 of the URL (`--name-by sha1`). Rows without an image are
counted and skipped (links die).

    vlp data cc --tsv Train_GCC-training.tsv --layout cc3m \\
        --images /data/cc3m/images --out /data/cc3m/shards
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

from vlp.data.shards_build import IMAGE_SUFFIXES, Record, write_shards

LAYOUTS = {"cc3m": ("caption", "url"), "cc12m": ("url", "caption")}


def image_index(folder: Path) -> dict[str, Path]:
    """Every image under `folder` by file stem."""
    return {p.stem: p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES}


def read_rows(tsv: str | Path, layout: str) -> list[dict[str, str]]:
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    columns = LAYOUTS[layout]
    rows = []
    with open(tsv, newline="", encoding="utf-8") as f:
        for line_number, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if len(row) != 2:
                raise ValueError(f"{tsv}:{line_number + 1}: expected 2 tab-separated fields "
                                 f"({' and '.join(columns)}), got {len(row)}")
            rows.append(dict(zip(columns, row, strict=True)))
    return rows


def records_from_tsv(tsv: str | Path, images: str | Path, *, layout: str,
                     name_by: str = "row") -> tuple[list[Record], int]:
    """(records of the rows whose image is there, number of rows without one)."""
    found = image_index(Path(images))
    records, missing = [], 0
    for row_number, row in enumerate(read_rows(tsv, layout)):
        stem = (f"{row_number:09d}" if name_by == "row"
                else hashlib.sha1(row["url"].encode()).hexdigest())
        path = found.get(stem)
        if path is None:
            missing += 1
            continue
        records.append(Record(str(path), row["caption"], row["url"], {"row": row_number}))
    return records, missing


def main(argv: list[str], prog: str) -> int:
    """The command line (`vlp data NAME ...`); see `data_tools.run`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--tsv", required=True)
    parser.add_argument("--layout", choices=tuple(LAYOUTS), required=True)
    parser.add_argument("--images", required=True, help="folder of downloaded images")
    parser.add_argument("--name-by", choices=("row", "sha1"), default="row")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--resize", type=int)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    records, missing = records_from_tsv(args.tsv, args.images, layout=args.layout,
                                        name_by=args.name_by)
    stats = write_shards(records, args.out, samples_per_shard=args.samples_per_shard,
                         resize=args.resize, workers=args.workers)
    print(json.dumps({"samples": stats["num_samples"], "shards": stats["num_shards"],
                      "rows_without_image": missing, "spec": stats["spec"]}, indent=1))
    return 0

