"""`vlp shards build | negatives | rewrites | inspect | validate`: argument parsing and printing only; the
work is in `vlp.data.shards_build` and `vlp.data.shard_inspect`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path


def user_errors(command: Callable[[argparse.Namespace], int]) -> Callable:
    """Bad input (a missing column, no images, ...) is one line on stderr and status 2."""

    @wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ValueError, FileNotFoundError) as err:
            print(f"vlp shards {args.shards_command}: error: {err}", file=sys.stderr)
            return 2

    return run


@user_errors
def cmd_build(args: argparse.Namespace) -> int:
    from vlp.data import shards_build as sb

    source = Path(args.input)
    if args.hf:
        records = sb.hf_records(args.input, split=args.split,
                                image_column=args.image_column or "image",
                                text_column=args.text_column or "text")
    elif source.is_dir():
        records = sb.folder_records(source)
    elif source.is_file():
        records = sb.table_records(source, image_column=args.image_column,
                                   text_column=args.text_column)
    else:
        raise FileNotFoundError(f"--input: no such folder or table {source}")
    stats = sb.write_shards(records, args.out, samples_per_shard=args.samples_per_shard,
                            resize=args.resize, prefix=args.prefix, workers=args.workers,
                            progress=not args.quiet)
    print(f"wrote {stats['num_samples']} samples in {stats['num_shards']} shards "
          f"({stats['total_bytes'] / 1e6:.1f} MB) to {args.out}; skipped {stats['num_skipped']}")
    print(f"shard spec: {stats['spec']}")
    print(f"stats: {Path(args.out) / 'stats.json'}")
    return 0


@user_errors
def cmd_negatives(args: argparse.Namespace) -> int:
    from vlp.data.shards_build import add_negatives

    totals = add_negatives(args.shards, args.out, num=args.num, seed=args.seed,
                           spacy_model=args.spacy, workers=args.workers, progress=not args.quiet)
    print(f"{totals['negatives']} hard negatives for {totals['with_negatives']} of "
          f"{totals['samples']} samples in {totals['shards']} shards, written to {args.out}")
    return 0


@user_errors
def cmd_rewrites(args: argparse.Namespace) -> int:
    from vlp.data.shards_build import add_rewrites

    totals = add_rewrites(args.shards, args.out, num=args.num, seed=args.seed,
                          spacy_model=args.spacy, workers=args.workers, progress=not args.quiet)
    print(f"{totals['rewrites']} rewrites for {totals['with_rewrites']} of "
          f"{totals['samples']} samples in {totals['shards']} shards, written to {args.out}")
    return 0


@user_errors
def cmd_inspect(args: argparse.Namespace) -> int:
    from vlp.data.shard_inspect import inspect_shards

    report = inspect_shards(args.shards, show=args.show)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['num_samples']} samples in {report['num_shards']} shards; members: "
          + ", ".join(f"{k} {v}" for k, v in sorted(report["members"].items())))
    for shard in report["shards"]:
        print(f"  {shard['url']}: {shard['samples']}")
    for sample in report["samples"]:
        print(json.dumps(sample, ensure_ascii=False))
    return 0


@user_errors
def cmd_validate(args: argparse.Namespace) -> int:
    from vlp.data.shard_inspect import validate_shards

    report = validate_shards(args.shards, num_negatives=args.num_negatives,
                             captions=args.captions)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for problem in report["corrupt"]:
            print(f"{problem['shard']} key {problem['key']}: {problem['reason']}")
        print(f"{report['num_samples']} samples in {report['num_shards']} shards, "
              f"{report['num_corrupt']} corrupt")
    return 1 if report["num_corrupt"] else 0


def _add_caption_annotation_args(parser: argparse.ArgumentParser, what: str) -> None:
    """The options `negatives` and `rewrites` share: both copy shards, adding `what` (that
    many at most per caption) to each sample's json."""
    parser.add_argument("--shards", required=True, help="shard spec, e.g. d/{000..009}.tar")
    parser.add_argument("--out", required=True, help="output folder (same shard names)")
    parser.add_argument("--num", type=int, default=3, help=f"{what} per caption (at most)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacy", metavar="MODEL", help="spaCy pipeline, e.g. en_core_web_sm")
    parser.add_argument("--workers", type=int, help="processes (default: one per core)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_shards_commands(shards_sub: argparse._SubParsersAction) -> None:
    build = shards_sub.add_parser(
        "build", help="image folder (+ .txt captions), CSV/TSV/parquet or HF dataset -> shards",
        description="Write webdataset training shards with deterministic keys, stats.json "
        "(samples, bytes, caption lengths, per-shard counts) and sizes.json.")
    build.add_argument("--input", required=True,
                       help="image folder with sidecar .txt captions, a .csv/.tsv/.parquet of "
                       "(image path, caption), or with --hf a Hugging Face dataset folder")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--hf", action="store_true", help="--input is a Hugging Face dataset")
    build.add_argument("--split", default="train", help="split of an --hf dataset")
    build.add_argument("--image-column", help="image column (default: path, filepath, image...)")
    build.add_argument("--text-column", help="caption column (default: caption, text, ...)")
    build.add_argument("--samples-per-shard", type=int, default=10_000)
    build.add_argument("--resize", type=int,
                       help="shrink images so the shorter side is at most this (re-encoded JPEG)")
    build.add_argument("--prefix", default="shard", help="shard file name prefix")
    build.add_argument("--workers", type=int, help="processes (default: one per core)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_build)

    negatives = shards_sub.add_parser(
        "negatives", help="add NegCLIP-style hard-negative captions to each sample's json",
        description="Copy shards, adding `neg_captions` (and `neg_kinds`) to each sample's "
        "json (replacing any already there): swapped noun phrases/adjectives/nouns, replaced "
        "relations/attributes, shuffled words. Rule-based; --spacy MODEL parses with an "
        "installed spaCy pipeline instead.")
    _add_caption_annotation_args(negatives, "negatives")
    negatives.set_defaults(func=cmd_negatives)

    rewrite = shards_sub.add_parser(
        "rewrites", help="add rule-based rewrites of each caption (true captions) to its json",
        description="Copy shards, adding `captions` (and `caption_kinds`) to each sample's json "
        "(replacing any already there): other true captions of the image made by rules (an "
        "adjective left out, two noun phrases joined by 'and' swapped, a spatial relation "
        "inverted), for data.captions: sample | all. --spacy MODEL parses with an installed "
        "spaCy pipeline instead.")
    _add_caption_annotation_args(rewrite, "rewrites")
    rewrite.set_defaults(func=cmd_rewrites)

    inspect = shards_sub.add_parser("inspect", help="count samples and show a few")
    inspect.add_argument("shards", help="shard spec")
    inspect.add_argument("--show", type=int, default=3, help="samples to show")
    inspect.add_argument("--json", action="store_true", help="print one JSON report")
    inspect.set_defaults(func=cmd_inspect)

    validate = shards_sub.add_parser(
        "validate", help="find corrupt members (exit status 1 if any)",
        description="Check every sample with the training pipeline's rules.")
    validate.add_argument("shards", help="shard spec")
    validate.add_argument("--num-negatives", type=int, default=0,
                          help="also require this many hard negatives per sample")
    validate.add_argument("--captions", action="store_true",
                          help="also check the json's extra true captions (data.captions)")
    validate.add_argument("--json", action="store_true", help="print one JSON report")
    validate.set_defaults(func=cmd_validate)
