"""Fashion-MNIST (Debian's `dataset-fashion-mnist`) → a CLIP_benchmark zero-shot set.

`apt-get install dataset-fashion-mnist` puts the IDX files (`t10k-images-idx3-ubyte.gz`,
`t10k-labels-idx1-ubyte.gz`, `train-*`) in /usr/share/datasets/fashion-mnist. This writes the
CLIP_benchmark webdataset layout that `vlp eval --task zeroshot` reads: `classnames.txt`,
`zeroshot_classification_templates.txt`, `test/{0..N-1}.tar` (KEY.png 28x28 greyscale saved as
RGB, KEY.cls) and `test/nshards.txt`; `--split train` writes the 60k training images instead.

    vlp data fashion-mnist --out /data/wds_fashion_mnist
    vlp eval --checkpoint RUN --task zeroshot --data /data/wds_fashion_mnist
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.eval.benchmark_data import write_benchmark

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# The labels 0..9 of the dataset's README, in words a caption would use.
CLASSNAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
              "bag", "ankle boot")
TEMPLATES = (
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a photo of the {c}, a type of clothing.",
    "a greyscale product photo of a {c}.",
    "a blurry photo of a {c}.",
)
_PREFIX = {"test": "t10k", "train": "train"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dims, then unsigned bytes), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(source: str | Path = DEBIAN_DIR, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    source = Path(source)
    images = read_idx(source / f"{_PREFIX[split]}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{_PREFIX[split]}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{source}: {len(images)} images but {len(labels)} labels")
    return images, labels


def convert(out: str | Path, *, source: str | Path = DEBIAN_DIR, split: str = "test",
            num_shards: int = 4, limit: int | None = None) -> dict:
    if split not in _PREFIX:
        raise ValueError(f"--split must be test or train, got {split!r}")
    if not (Path(source) / f"{_PREFIX[split]}-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"no Fashion-MNIST files in {source}; install them with "
                                "`apt-get install dataset-fashion-mnist` or pass --source")
    images, labels = load_split(source, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    samples = [(Image.fromarray(image).convert("RGB"), int(label))
               for image, label in zip(images, labels, strict=True)]
    write_benchmark(out, samples, classnames=CLASSNAMES, templates=TEMPLATES,
                    num_shards=min(num_shards, len(samples)), split="test")
    return {"samples": len(samples), "classes": len(CLASSNAMES),
            "per_class": np.bincount(labels, minlength=len(CLASSNAMES)).tolist()}


def main(argv: list[str], prog: str) -> int:
    """The command line (`vlp data NAME ...`); see `data_tools.run`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--source", default=str(DEBIAN_DIR), help="folder of the IDX .gz files")
    parser.add_argument("--split", choices=tuple(_PREFIX), default="test")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--limit", type=int, help="only the first N images")
    args = parser.parse_args(argv)
    print(json.dumps(convert(args.out, source=args.source, split=args.split,
                             num_shards=args.num_shards, limit=args.limit), indent=1))
    return 0

