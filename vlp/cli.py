"""`vlp train | eval | export | embed | shards synth|build|negatives|inspect|validate` — the
command line."""

from __future__ import annotations

import argparse
import signal
import sys

from vlp.config import ConfigError
from vlp.data.command import add_shards_commands


def cmd_train(args: argparse.Namespace) -> int:
    from vlp.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    from vlp.train.loop import train
    from vlp.train.nonfinite import NonFiniteLossError

    try:
        result = train(cfg)
    except NonFiniteLossError as err:  # the run failed (exit 1): one line, not a traceback
        print(f"\nvlp train: error: {err}", file=sys.stderr)  # below the progress bar
        return 1
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


def cmd_eval(args: argparse.Namespace) -> int:
    from vlp.eval.command import run_eval_command

    return run_eval_command(args)


def _user_error(command: str, err: Exception) -> int:
    print(f"vlp {command}: error: {err}", file=sys.stderr)
    return 2


def cmd_export(args: argparse.Namespace) -> int:
    from vlp.checkpoint import CheckpointError
    from vlp.export import ExportError, export_checkpoint
    from vlp.models.hf_clip import ConversionError

    try:
        out = export_checkpoint(args.checkpoint, args.out, format=args.format,
                                overwrite=args.overwrite)
    except (CheckpointError, ExportError, ConversionError) as err:
        return _user_error("export", err)
    print(f"exported {args.checkpoint} ({args.format}) to {out}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from vlp.checkpoint import CheckpointError
    from vlp.embed import embed_to_parquet

    try:
        result = embed_to_parquet(
            args.checkpoint, out=args.out, images=args.images, texts=args.texts,
            batch_size=args.batch_size, device=args.device, num_workers=args.num_workers,
            progress=not args.quiet)
    except (CheckpointError, ValueError) as err:
        return _user_error("embed", err)
    print(f"wrote {result.num_images} image and {result.num_texts} text embeddings to "
          f"{result.out}" + (f"; skipped {len(result.skipped)} unreadable images"
                             if result.skipped else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a recipe: vlp train RECIPE.yaml [a.b=value ...]")
    train.add_argument("recipe", help="YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "eval", help="evaluate a checkpoint: vlp eval --checkpoint CKPT [--suite S.yaml | --task T "
        "--data PATH]", description="Run an eval suite (default eval/suites/shapesworld.yaml) or "
        "one benchmark on a vlp checkpoint folder or an open_clip model; writes one JSON per "
        "benchmark, results.json and report.md (with plots) under --out.")
    evaluate.add_argument("--checkpoint", required=True,
                          help="vlp checkpoint folder, or open_clip:MODEL[:WEIGHTS_FILE]")
    what = evaluate.add_mutually_exclusive_group()
    what.add_argument("--suite", help="suite YAML (default: eval/suites/shapesworld.yaml)")
    what.add_argument("--task", help="run one benchmark of this task (zeroshot, retrieval, "
                      "sugarcrepe, aro, order, gap) on --data")
    evaluate.add_argument("--data", help="data root for --task")
    evaluate.add_argument("--out", help="output folder (default: eval-out/<suite or task>-<model>)")
    evaluate.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    evaluate.add_argument("--batch-size", type=int, help="images/captions per forward pass")
    evaluate.add_argument("--num-workers", type=int, help="DataLoader workers decoding images")
    evaluate.add_argument("--path", action="append", default=[], metavar="NAME=DIR",
                          help="fill a suite placeholder ${NAME} (repeatable)")
    evaluate.add_argument("--only", help="comma-separated suite benchmarks to run")
    evaluate.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                          help="an option of --task, e.g. image_root=/data/coco/val2017")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.add_argument("overrides", nargs="*",
                          help="dotted suite overrides, e.g. shapesworld.params.num_eval=500")
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser(
        "export", help="export a checkpoint: vlp export --checkpoint CKPT --format open_clip|hf "
        "--out DIR", description="Write a checkpoint's model as an open_clip local-dir: folder "
        "(open_clip.create_model_and_transforms('local-dir:DIR')) or a transformers CLIPModel "
        "folder (CLIPModel/CLIPProcessor.from_pretrained(DIR)); neither needs vlp to load.")
    export.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    export.add_argument("--format", required=True, choices=("open_clip", "hf"))
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.set_defaults(func=cmd_export)

    embed = sub.add_parser(
        "embed", help="embed images and texts: vlp embed --checkpoint CKPT --images DIR|SHARDS "
        "--texts FILE --out FILE.parquet", description="Batched, L2-normalised embeddings "
        "into one parquet file (columns modality, id, path, text, embedding list<float32>).")
    embed.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    embed.add_argument("--images", help="image folder (recursive) or webdataset shard spec")
    embed.add_argument("--texts", help="text file, one text per line")
    embed.add_argument("--out", required=True, help="output .parquet file")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    embed.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
    embed.add_argument("--quiet", action="store_true", help="no progress bars")
    embed.set_defaults(func=cmd_embed)

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
    add_shards_commands(shards_sub)  # build, negatives, inspect, validate
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"vlp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a Ctrl-C before training starts, or a second one during it
        print(f"vlp {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
