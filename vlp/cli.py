"""`vlp train | shards synth` — the command line."""

from __future__ import annotations

import argparse
import sys

from vlp.config import ConfigError


def cmd_train(args: argparse.Namespace) -> int:
    from vlp.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    from vlp.train.loop import train

    result = train(cfg)
    if result.stopped_by_signal is not None:
        return 128 + max(result.stopped_by_signal, 0)
    if result.report is not None:
        print(f"report: {result.report}")
        print(f"results: {result.run_dir / 'results.json'}")
    return 0


def cmd_shards_synth(args: argparse.Namespace) -> int:
    from vlp.data.shapesworld_writer import write_shapesworld

    manifest = write_shapesworld(
        args.out, num_train=args.num_train, num_eval=args.num_eval, seed=args.seed,
        image_size=args.image_size, samples_per_shard=args.samples_per_shard,
    )
    print(f"wrote ShapesWorld to {args.out}: {manifest.get('counts', manifest)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a recipe: vlp train RECIPE.yaml [a.b=value ...]")
    train.add_argument("recipe", help="YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    train.set_defaults(func=cmd_train)

    shards = sub.add_parser("shards", help="make and inspect webdataset shards")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    synth = shards_sub.add_parser("synth", help="generate the ShapesWorld dataset")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--num-train", type=int, default=50_000)
    synth.add_argument("--num-eval", type=int, default=2_000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--samples-per-shard", type=int, default=5_000)
    synth.set_defaults(func=cmd_shards_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"vlp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
