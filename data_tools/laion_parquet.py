"""LAION / DataComp metadata parquet with images already downloaded → training shards.

The parquet files hold one row per image: LAION `URL`, `TEXT` (+ `similarity`, `WIDTH`,
`HEIGHT`, ...), DataComp `uid`, `url`, `text`; img2dataset output adds `key` and `status`. An
image is looked up in `--images` by the row's `key` (img2dataset), else `uid` (DataComp), as a
file stem; rows with `status` other than `success`, or without an image, are skipped and
counted. The other columns go into each sample's json.

    vlp data laion-parquet --parquet 'meta/*.parquet' --images /data/laion/files \\
        --out /data/laion/shards
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path

from data_tools.cc_tsv import image_index
from vlp.data.shards_build import Record, write_shards

TEXT_COLUMNS = ("TEXT", "text", "caption")
URL_COLUMNS = ("URL", "url")
ID_COLUMNS = ("key", "uid")


def _first(columns, names: tuple[str, ...], what: str, where: str) -> str:
    for name in names:
        if name in columns:
            return name
    raise ValueError(f"{where}: no {what} column (looked for {', '.join(names)}); "
                     f"columns: {list(columns)}")


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def records_from_parquet(pattern: str, images: str | Path) -> tuple[list[Record], dict]:
    import pandas as pd

    files = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
    if not files:
        raise FileNotFoundError(f"--parquet: no file matches {pattern}")
    found = image_index(Path(images))
    records, counts = [], {"rows": 0, "not_downloaded": 0, "no_image_file": 0}
    for file in files:
        frame = pd.read_parquet(file)
        text = _first(frame.columns, TEXT_COLUMNS, "caption", file)
        url = _first(frame.columns, URL_COLUMNS, "url", file)
        ident = _first(frame.columns, ID_COLUMNS, "key/uid", file)
        for row in frame.to_dict("records"):
            counts["rows"] += 1
            if row.get("status", "success") != "success":
                counts["not_downloaded"] += 1
                continue
            path = found.get(str(row[ident]))
            if path is None:
                counts["no_image_file"] += 1
                continue
            meta = {k: _plain(v) for k, v in row.items() if k not in (text,)}
            records.append(Record(str(path), str(row[text] or ""), str(row[url]), meta))
    return records, counts


def main(argv: list[str], prog: str) -> int:
    """The command line (`vlp data NAME ...`); see `data_tools.run`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--parquet", required=True, help="a parquet file or a glob pattern")
    parser.add_argument("--images", required=True, help="folder of downloaded images")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--resize", type=int)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    records, counts = records_from_parquet(args.parquet, args.images)
    stats = write_shards(records, args.out, samples_per_shard=args.samples_per_shard,
                         resize=args.resize, workers=args.workers)
    print(json.dumps({**counts, "samples": stats["num_samples"], "spec": stats["spec"]},
                     indent=1))
    return 0

