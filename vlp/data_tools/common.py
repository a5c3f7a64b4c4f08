"""Shared by the converters: the CLIP_benchmark retrieval layout, written from image files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import webdataset as wds

from vlp.data.shards_build import IMAGE_SUFFIXES


def write_retrieval(root: str | Path, items: Sequence[tuple[Path, list[str]]], *,
                    samples_per_shard: int = 1000, split: str = "test") -> dict:
    """`items` of (image file, its captions) → `root/dataset_type.txt`, `root/{split}/{i}.tar`
    (KEY.jpg|png|webp as the file was, KEY.txt one caption a line) and `nshards.txt`.
    Images that are missing are left out and counted."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    present = [(Path(p), caps) for p, caps in items if Path(p).is_file()]
    num_shards = max(1, -(-len(present) // samples_per_shard))
    for shard in range(num_shards):
        with wds.TarWriter(str(root / split / f"{shard}.tar"), encoder=False, mtime=0) as sink:
            for index in range(shard * samples_per_shard,
                               min((shard + 1) * samples_per_shard, len(present))):
                path, captions = present[index]
                ext = IMAGE_SUFFIXES.get(path.suffix.lower(), "jpg")
                sink.write({"__key__": f"s{index:07d}", ext: path.read_bytes(),
                            "txt": "\n".join(c.strip() for c in captions).encode()})
    (root / split / "nshards.txt").write_text(f"{num_shards}\n")
    return {"images": len(present), "missing": len(items) - len(present),
            "captions": sum(len(c) for _, c in present), "shards": num_shards}
