"""FLIP token dropping on ShapesWorld: training samples/s and zero-shot accuracy of the tiny ViT
with `model.patch_dropout` r against r = 0 (no masking).

    python benchmarks/flip_shapesworld.py [--ratios 0 0.5 0.75] [--batch-size 128]
        [--warmup 3] [--steps 10] [--repeats 3] [--accuracy-steps 100] [--accuracy-ratios 0 0.5]
        [--out runs/flip-shapesworld] [--cache-dir ~/.cache/vlp]

Speed: one model per ratio (same init), each trained in this process on the same in-memory
ShapesWorld batch (rendered and preprocessed once, so that data loading is not measured): a
full training step (forward in train mode, open_clip's `ClipLoss`, backward, vlp's AdamW step).
Each repeat runs every ratio back to back, `--warmup` untimed steps then `--steps` timed ones,
the order rotating from repeat to repeat; speedups are taken within a repeat (r = 0's time
over r's) and the table gives their median and range, beside the median samples/s and CPU
ms/sample (CPU time of this process, less moved by other jobs on the cores).

Accuracy (`--accuracy-steps` > 0): `vlp train recipes/shapesworld-tiny-flip.yaml` in a
subprocess for each of `--accuracy-ratios`, with `model.patch_dropout`, the steps and the batch
size overridden and everything else (seed, data, schedule: warmup 50, cosine to 0) the
recipe's; then zero-shot top-1 on seen and held-out colour-shape combinations, as `vlp train`
reports it at the end of the run (`results.json`, evaluated with every patch), and the run's
own logged samples/s (data loading included) over its last log window.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "shapesworld-tiny-flip.yaml"
ZEROSHOT_SETS = ("zeroshot", "zeroshot_heldout")


def shapesworld_batch(batch_size: int, preprocess: Any, tokenizer: Any) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """`batch_size` ShapesWorld training samples (seed 0), preprocessed and tokenized."""
    from vlp.data.shapesworld import make_train_sample, render_image

    samples = [make_train_sample(i, seed=0) for i in range(batch_size)]
    images = torch.stack([preprocess(render_image(s.scene)) for s in samples])
    return images, tokenizer([s.caption for s in samples])


class Trainer:
    """One model and its optimizer, stepping on a fixed batch."""

    def __init__(self, model_name: str, ratio: float, images: torch.Tensor, text: torch.Tensor):
        from open_clip.loss import ClipLoss

        from vlp.config import OptimConfig
        from vlp.models import build_model
        from vlp.train.optim import build_optimizer

        torch.manual_seed(0)
        self.model = build_model(model_name, patch_dropout=ratio).model.train()
        self.optimizer = build_optimizer(self.model, OptimConfig(lr=1e-3, weight_decay=0.1))
        self.loss = ClipLoss()
        self.images, self.text = images, text

    def step(self) -> None:
        out = self.model(self.images, self.text)
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, warmup: int, steps: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of `steps` steps after `warmup` untimed ones."""
        for _ in range(warmup):
            self.step()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        return time.perf_counter() - wall, time.process_time() - cpu


def measure_speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per repeat and ratio: wall and CPU seconds of `args.steps` steps."""
    from vlp.models import build_model

    probe = build_model(args.model)
    images, text = shapesworld_batch(args.batch_size, probe.preprocess_train, probe.tokenizer)
    trainers = {r: Trainer(args.model, r, images, text) for r in args.ratios}
    rows = []
    for repeat in range(args.repeats):
        shift = repeat % len(args.ratios)
        order = args.ratios[shift:] + args.ratios[:shift]
        for ratio in order:
            wall, cpu = trainers[ratio].timed(args.warmup, args.steps)
            load = os.getloadavg()[0]
            rows.append({"repeat": repeat, "ratio": ratio, "wall_s": wall, "cpu_s": cpu,
                         "position": order.index(ratio), "load1": load})
            print(f"repeat {repeat} r={ratio}: {args.steps * args.batch_size / wall:.1f} "
                  f"samples/s (1-min load {load:.1f})", flush=True)
    return rows


def speed_table(rows: Sequence[dict[str, Any]], *, batch_size: int, steps: int,
                baseline: float) -> str:
    """Median samples/s and CPU ms/sample per ratio, and the median (range) of the speedups
    over `baseline` taken within each repeat."""
    samples = batch_size * steps
    by = {(r["repeat"], r["ratio"]): r for r in rows}
    lines = ["| patch_dropout | samples/s (median) | CPU ms/sample (median) | speedup vs "
             f"{baseline:g}, per repeat: median (range) | samples/s per repeat |",
             "|---:|---:|---:|---:|---|"]
    for ratio in dict.fromkeys(r["ratio"] for r in rows):
        mine = [r for r in rows if r["ratio"] == ratio]
        rates = [samples / r["wall_s"] for r in mine]
        cpu = [1000 * r["cpu_s"] / samples for r in mine]
        speedups = [by[(r["repeat"], baseline)]["wall_s"] / r["wall_s"] for r in mine]
        lines.append(f"| {ratio:g} | {statistics.median(rates):.1f} | "
                     f"{statistics.median(cpu):.2f} | {statistics.median(speedups):.2f}x "
                     f"({min(speedups):.2f}–{max(speedups):.2f}) | "
                     f"{', '.join(f'{x:.1f}' for x in rates)} |")
    return "\n".join(lines)


def train_accuracy(ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    """`vlp train` the flip recipe with `ratio` for `args.accuracy_steps`; its zero-shot top-1."""
    run_dir = (args.out / f"flip-r{ratio:g}").resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    steps = args.accuracy_steps
    command = [sys.executable, "-m", "vlp", "train", str(RECIPE), f"model.patch_dropout={ratio}",
               f"output_dir={run_dir}", f"train.steps={steps}",
               f"data.batch_size={args.batch_size}", f"data.cache_dir={args.cache_dir}",
               f"checkpoint.every={steps}", "checkpoint.keep_last=1", "checkpoint.resume=never",
               "train.trackers=[jsonl]"]
    print(f"r={ratio}: {' '.join(command[2:])} (1-min load {os.getloadavg()[0]:.1f})",
          flush=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        tail = (run_dir / "train.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"r={ratio}: `vlp train` failed ({code}); end of its log:\n{tail}")
    from vlp.train.metrics import read_metrics

    results = json.loads((run_dir / "results.json").read_text())
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    return {"ratio": ratio, "seconds": time.perf_counter() - start,
            "samples_per_s": last.get("samples_per_s"), "loss": last.get("loss"),
            **{name: results[name]["acc1"] for name in ZEROSHOT_SETS}}


def accuracy_table(runs: Sequence[dict[str, Any]], *, steps: int, batch_size: int) -> str:
    lines = [f"| patch_dropout | zero-shot seen acc1 | zero-shot held-out acc1 | last loss | "
             f"samples/s (last log window) | run time ({steps} steps of {batch_size} + eval) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(f"| {run['ratio']:g} | {run['zeroshot']:.3f} | {run['zeroshot_heldout']:.3f}"
                     f" | {run['loss']:.3f} | {run['samples_per_s']:.1f} | "
                     f"{run['seconds']:.0f} s |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vlp-tiny", help="a model with a ViT image tower "
                        "(speed only; the accuracy runs train the recipe's vlp-tiny)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75],
                        help="patch_dropout values timed (the first is the baseline)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each window")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per window")
    parser.add_argument("--repeats", type=int, default=3, help="0 = no speed measurement")
    parser.add_argument("--accuracy-steps", type=int, default=100,
                        help="steps of each `vlp train` accuracy run (0 = no accuracy runs)")
    parser.add_argument("--accuracy-ratios", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--out", type=Path, default=Path("runs/flip-shapesworld"))
    parser.add_argument("--cache-dir", default="~/.cache/vlp", help="ShapesWorld cache")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    rows = measure_speed(args) if args.repeats else []
    if rows:
        speed = speed_table(rows, batch_size=args.batch_size, steps=args.steps,
                            baseline=args.ratios[0])
        print(f"\n{args.model} on ShapesWorld, batch {args.batch_size}, fp32, {args.steps} timed "
              f"steps after {args.warmup} per window, {args.repeats} repeats:\n")
        print(speed, flush=True)
    results = args.out / "results.json"
    results.write_text(json.dumps({"speed": rows, "accuracy": []}, indent=1))
    runs = []
    for ratio in args.accuracy_ratios if args.accuracy_steps else []:
        runs.append(train_accuracy(ratio, args))
        results.write_text(json.dumps({"speed": rows, "accuracy": runs}, indent=1))
    if runs:
        accuracy = accuracy_table(runs, steps=args.accuracy_steps, batch_size=args.batch_size)
        print(f"\nshapesworld-tiny-flip.yaml, {args.accuracy_steps} steps, seed 0:\n")
        print(accuracy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
