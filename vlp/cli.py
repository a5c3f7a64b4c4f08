"""`vlp train | eval | export | embed | shards synth|build|negatives|inspect|validate | data` —
the command line."""

from __future__ import annotations

import argparse
import signal
import sys

from data_tools import CONVERTERS
from vlp import __version__, resources
from vlp.config import ConfigError
from vlp.data.command import add_shards_commands


def cmd_train(args: argparse.Namespace) -> int:
    """Exit status 2: the run could not start (config, recipe, checkpoint to resume); 1: it
    started and failed (no usable sample, too many non-finite steps); each is one line."""
    from vlp.checkpoint import CheckpointError
    from vlp.config import load_config
    from vlp.data.pipeline import DataError
    from vlp.data.sources import announce_pipe_commands

    cfg = load_config(resources.find_recipe(args.recipe), args.overrides)
    announce_pipe_commands(cfg.data.shards)
    from vlp.train.loop import train
    from vlp.train.nonfinite import NonFiniteLossError

    try:
        result = train(cfg)
    except CheckpointError as err:
        return _user_error("train", err)
    except (DataError, NonFiniteLossError) as err:
        return _user_error("train", err, status=1)
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


def cmd_data(args: argparse.Namespace) -> int:
    from data_tools import run

    return run(args.converter, args.converter_args)


def _user_error(command: str, err: Exception, status: int = 2) -> int:
    """One line on stderr, whatever the message holds."""
    print(f"vlp {command}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return status


def cmd_export(args: argparse.Namespace) -> int:
    from vlp.checkpoint import CheckpointError
    from vlp.export import ExportError, export_checkpoint
    from vlp.models.hf_clip import ConversionError

    try:
        out = export_checkpoint(args.checkpoint, args.out, format=args.format,
                                overwrite=args.overwrite, gap_reference=args.gap_reference)
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
    parser.add_argument("--version", action="version", version=f"vlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train from a recipe: vlp train RECIPE [a.b=value ...]",
        description="Train from a recipe: a YAML file, or the name of a recipe vlp ships.\n"
        "Every key is a typed field of vlp/config.py (RunConfig and its sections, each\n"
        "documented there; the README's Recipes section shows them together), and any key can\n"
        "be overridden on the command line as section.key=value.",
        epilog=_shipped_recipes(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", help="recipe file, or a shipped recipe's name (listed below)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "eval", help="evaluate checkpoints: vlp eval --checkpoint CKPT [CKPT ...] [--all-steps] "
        "[--suite S.yaml | --task T --data PATH]", description="Run an eval suite (default: the "
        "shipped shapesworld suite) or one benchmark on a vlp checkpoint folder or an open_clip "
        "model; writes one JSON per benchmark, results.json and report.md (with plots) under "
        "--out. Several checkpoints are evaluated one after another in one process (decoded "
        "images and tokens kept across them), each into its own subfolder of --out, under a "
        "summary (results.json, report.md) of every benchmark's headline metric.")
    evaluate.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                          help="vlp checkpoint or run folder (its latest checkpoint), or "
                          "open_clip:MODEL:WEIGHTS_FILE (open_clip:MODEL:random for a randomly "
                          "initialised model); several are evaluated one after another in one "
                          "process, each into its own subfolder of --out, with a summary on top")
    evaluate.add_argument("--all-steps", action="store_true",
                          help="a run folder given to --checkpoint stands for every step-N "
                          "checkpoint in it, in step order, instead of its latest")
    what = evaluate.add_mutually_exclusive_group()
    what.add_argument("--suite", help="suite YAML, or a shipped suite's name: "
                      f"{', '.join(resources.suites())} (default: shapesworld)")
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
    export.add_argument("--gap-reference", metavar="ROOT",
                        help="also store the mean image and text embedding of this benchmark "
                             "root (modality_means.json) for post-hoc gap removal")
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

    data = sub.add_parser(
        "data", help="convert a public dataset you have on disk: vlp data NAME --out DIR ...",
        description="Convert a public dataset already on disk to training shards or a "
        "benchmark set; `vlp data NAME --help` shows a converter's options.")
    converters = data.add_subparsers(dest="converter", required=True, metavar="NAME")
    for name, (_, summary) in CONVERTERS.items():
        # the converter parses its own options (imported only to run), so no --help here
        converters.add_parser(name, help=summary, add_help=False)
    data.set_defaults(func=cmd_data)
    return parser


def _shipped_recipes() -> str:
    shipped = resources.recipes()
    width = max(map(len, shipped), default=0)
    lines = [f"  {name:<{width}}  {resources.summary(path)}" for name, path in shipped.items()]
    return "shipped recipes (vlp train NAME):\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "data":
        args.converter_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except Exception as e:
        from vlp.checkpoint import CheckpointError  # e.g. a tampered model.pretrained checkpoint

        if not isinstance(e, (ConfigError, CheckpointError, FileNotFoundError)):
            raise
        return _user_error(args.command, e)
    except KeyboardInterrupt:  # a Ctrl-C before training starts, or a second one during it
        print(f"vlp {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
