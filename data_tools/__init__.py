"""Converters from public datasets you already have on disk to vlp's formats (training shards,
CLIP_benchmark layouts), run as `vlp data NAME --help`. None downloads anything.

This module stays free of heavy imports: `vlp` builds its command line from `CONVERTERS` and
imports a converter only to run it.
"""

from __future__ import annotations

import importlib
import sys

CONVERTERS: dict[str, tuple[str, str]] = {
    "fashion-mnist": ("fashion_mnist", "Fashion-MNIST (Debian's dataset-fashion-mnist) → a "
                      "zero-shot set"),
    "karpathy": ("karpathy_captions", "COCO / Flickr30k Karpathy splits → training shards and "
                 "retrieval sets"),
    "cc": ("cc_tsv", "CC3M / CC12M TSV + downloaded images → training shards"),
    "laion-parquet": ("laion_parquet", "LAION / DataComp parquet + downloaded images → "
                      "training shards"),
}
"""`vlp data` name → (module of this package, one-line summary)."""


def run(name: str, argv: list[str]) -> int:
    """Run converter `name` on its command-line arguments; a missing input, or a file in the
    wrong format, is one line on stderr and status 2."""
    prog = f"vlp data {name}"
    module = importlib.import_module(f"{__name__}.{CONVERTERS[name][0]}")
    try:
        return module.main(argv, prog=prog)
    except (FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
