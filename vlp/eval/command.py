"""`vlp eval`: load a model, resolve a suite (or one benchmark), run it, print a summary."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import yaml

from vlp.eval.loading import OPEN_CLIP_PREFIX, load_model
from vlp.eval.multi import (
    checkpoint_of_step,
    evaluate_checkpoints,
    expand_checkpoints,
    print_summary,
)
from vlp.eval.runner import evaluate_suite
from vlp.eval.suite import DEFAULT_SUITE, Suite, load_suite, single_task_suite
from vlp.eval.tasks import TASKS, resolve_device


def run_eval_command(args: argparse.Namespace) -> int:
    """Run `vlp eval` with parsed arguments; user errors print one line and return 2. Several
    checkpoints (or `--all-steps`) go to `vlp.eval.multi`; one is evaluated as below."""
    try:
        checkpoints = _split_overrides(args)
        if len(checkpoints) > 1 or args.all_steps:
            checkpoints = expand_checkpoints(checkpoints, all_steps=args.all_steps)
        suite = _suite(args)
        device = resolve_device(args.device)
        if len(checkpoints) > 1:
            return _run_several(args, checkpoints, suite, device)
        loaded = load_model(checkpoints[0], device=device)
    except (ValueError, FileNotFoundError) as err:
        print(f"vlp eval: error: {err}", file=sys.stderr)
        return 2
    out = (Path(args.out) if args.out
           else Path("eval-out") / f"{suite.name}-{_label(checkpoints[0])}")
    try:
        result = evaluate_suite(loaded.model, loaded.tokenizer, loaded.preprocess, suite, out,
                                device=device, model_name=loaded.name,
                                pretrained=loaded.pretrained, progress=not args.quiet)
    except ValueError as err:
        print(f"vlp eval: error: {err}", file=sys.stderr)
        return 2
    print(f"\n{'benchmark':<22} {'metric':<28} {'value':>8}")
    for spec in suite.benchmarks:
        metric = TASKS[spec.task].headline
        value = result.results[spec.name].metrics.get(metric, float("nan"))
        print(f"{spec.name:<22} {metric:<28} {value:>8.4f}")
    print(f"\nreport: {result.files['report']}\nresults: {result.files['results']}")
    return 0


def _run_several(args: argparse.Namespace, checkpoints: list[str], suite: Suite,
                 device: torch.device) -> int:
    """Status 1 if a checkpoint failed (the others were still evaluated), else 0."""
    out = (Path(args.out) if args.out
           else Path("eval-out") / f"{suite.name}-{_runs_label(checkpoints)}")
    rows, files = evaluate_checkpoints(checkpoints, suite, out, device=device,
                                       progress=not args.quiet)
    print_summary(rows, suite, files)
    return 1 if any(row.error for row in rows) else 0


def _split_overrides(args: argparse.Namespace) -> list[str]:
    """The checkpoints given. `--checkpoint CKPT key=value` hands both to --checkpoint (it takes
    several); a value that names no file and holds `=` is a suite override, as it was when
    --checkpoint took one value."""
    checkpoints, overrides = [], []
    for value in args.checkpoint:
        is_override = ("=" in value and not value.startswith(OPEN_CLIP_PREFIX)
                       and not Path(value).exists())
        (overrides if is_override else checkpoints).append(value)
    if not checkpoints:
        raise ValueError(f"--checkpoint: no checkpoint given ({' '.join(overrides)}: suite "
                         "overrides, as they name no file)")
    args.overrides = [*overrides, *args.overrides]
    return checkpoints


def _suite(args: argparse.Namespace) -> Suite:
    if args.task is None:
        if args.data or args.option:
            raise ValueError("--data and --option go with --task; a suite names its own data")
        overrides = list(args.overrides)
        if args.batch_size is not None:
            overrides.append(f"batch_size={args.batch_size}")
        if args.num_workers is not None:
            overrides.append(f"num_workers={args.num_workers}")
        only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        return load_suite(args.suite or DEFAULT_SUITE, overrides=overrides,
                          paths=_pairs(args.path, "--path"), only=only,
                          progress=not args.quiet)
    if args.data is None:
        raise ValueError(f"--task {args.task} needs --data PATH")
    if args.overrides or args.path or args.only:
        raise ValueError("suite overrides, --path and --only go with --suite, not --task")
    options = {k: yaml.safe_load(v) for k, v in _pairs(args.option, "--option").items()}
    return single_task_suite(args.task, args.data, options=options,
                             batch_size=args.batch_size or 64, num_workers=args.num_workers or 0)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE")
        pairs[key] = value
    return pairs


def _runs_label(checkpoints: list[str]) -> str:
    """`<run>-steps` for checkpoints of one run folder, else `<n>-checkpoints`."""
    runs = {Path(c).resolve().parent for c in checkpoints if not c.startswith(OPEN_CLIP_PREFIX)}
    if len(runs) == 1 and all(checkpoint_of_step(c) is not None for c in checkpoints):
        return _label(str(next(iter(runs)))) + "-steps"
    return f"{len(checkpoints)}-checkpoints"


def _label(spec: str) -> str:
    if spec.startswith(OPEN_CLIP_PREFIX):
        label = spec[len(OPEN_CLIP_PREFIX):].split(":")[0]
    else:
        path = Path(spec).resolve()
        label = f"{path.parent.name}-{path.name}" if path.name.startswith("step-") else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
