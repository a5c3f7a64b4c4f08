"""ShapesWorld generation speed on one core, and the writer end to end.

    python benchmarks/shapesworld_speed.py [--num-samples 5000] [--image-size 64]

Prints a table: samples/s for scene + caption + hard negatives, for that plus rendering and
PNG encoding (what one writer process does per sample), and for `write_shapesworld` training
shards with one and with every worker process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from vlp.data.shapesworld import encode_png, make_train_sample, render_image
from vlp.data.shapesworld_writer import write_shapesworld


def rate(fn, num_samples: int) -> float:
    start = time.perf_counter()
    fn(num_samples)
    return num_samples / (time.perf_counter() - start)


def text_only(n: int, image_size: int) -> None:
    for i in range(n):
        make_train_sample(i, seed=0, image_size=image_size)


def with_png(n: int, image_size: int) -> None:
    for i in range(n):
        sample = make_train_sample(i, seed=0, image_size=image_size)
        encode_png(render_image(sample.scene, image_size))


def writer(n: int, image_size: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as out:
        write_shapesworld(out, num_train=n, num_eval=1, image_size=image_size,
                          samples_per_shard=max(1, n // 4), num_workers=workers, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=5_000)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    n, size = args.num_samples, args.image_size
    cpus = os.cpu_count() or 1
    rows = [
        ("scene + caption + negatives (1 core)", rate(lambda k: text_only(k, size), n)),
        ("+ render + PNG encode (1 core)", rate(lambda k: with_png(k, size), n)),
        ("write_shapesworld train shards, 1 worker", rate(lambda k: writer(k, size, 1), n)),
        (f"write_shapesworld train shards, {cpus} workers", rate(lambda k: writer(k, size, cpus), n)),
    ]
    print(f"ShapesWorld generation, {n} samples, {size}px, {cpus} CPUs")
    print(f"{'stage':<48} {'samples/s':>10}")
    for name, value in rows:
        print(f"{name:<48} {value:>10,.0f}")


if __name__ == "__main__":
    main()
