"""Generated datasets cached on disk: made once, atomically, then reused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

SHAPESWORLD_FORMAT = 3
"""Bump when the generator's output changes, so stale caches are not reused (3: training
samples' json carries `captions`)."""


def shapesworld_dir(cache_dir: str | Path, params: dict[str, Any]) -> Path:
    """The cache folder for ShapesWorld generated with `params` (write_shapesworld kwargs)."""
    key = json.dumps({"format": SHAPESWORLD_FORMAT, **params}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / f"shapesworld-{digest}"


def prepare_shapesworld(cache_dir: str | Path, params: dict[str, Any], *, progress: bool = True) -> Path:
    """Generate ShapesWorld into the cache unless a complete copy is already there."""
    from vlp.data.shapesworld_writer import write_shapesworld

    root = shapesworld_dir(cache_dir, params)
    if (root / "manifest.json").is_file():
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"generating ShapesWorld into {root} (first use; cached afterwards)", flush=True)
    write_shapesworld(tmp, **params, progress=progress)
    if (root / "manifest.json").is_file():  # another process finished first
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    return root


def train_shards_spec(root: str | Path) -> str:
    """All training shards of a generated set as one `::`-joined shard spec."""
    shards = sorted((Path(root) / "train").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no training shards in {Path(root) / 'train'}")
    return "::".join(str(p) for p in shards)
