"""Does a 2-process ring + gradient-cache run learn as well as one process on the same batch?

    python benchmarks/ring_grad_cache_shapesworld.py [--steps 80] [--global-batch 256]
        [--micro-batch 64] [--lr 2e-3] [--warmup 10] [--model NAME] [--plain-accum] [--reuse]
        [--work-dir DIR]

Runs `recipes/shapesworld-tiny.yaml` (vlp-tiny, CLIP loss, ShapesWorld from the cache) with the
same global batch G, steps, seed and schedule (2-rank runs: `accelerate launch --multi_gpu
--num_processes 2 -m vlp train`, loss.backend=ring):
- `one_process`: one process, data.batch_size = G;
- `ring`: 2 ranks × G/2 rows, no accumulation: the same samples, rank by rank, as the next run;
- `ring_grad_cache`: 2 ranks × n micro-batches × m rows (m = --micro-batch, n = G / 2m) with
  train.grad_cache=true: every step is again one contrastive batch of G rows;
- with `--plain-accum`, `ring_plain_accum`: the previous run without the cache, so each
  micro-batch is its own contrastive batch of 2m rows (what plain accumulation gives).

`ring` and `ring_grad_cache` read the same sample streams (every rank reads its own), so with a
model without batch statistics (`--model vlp-tiny`, a ViT) their loss curves agree up to
floating-point rounding, which grows slowly with the steps; the script prints their logged losses
over the first 20 steps. With BatchNorm (the recipe's `vlp-tiny-rn`) every micro-batch of m rows
is normalised on its own, as every rank is under DDP, so the cached run is a different (valid)
model function and the curves differ from the first step. `one_process` draws other
samples (one stream instead of two), which is the run-to-run spread to compare against. For
every run the table gives zero-shot acc1/acc5 from its `results.json` (2,000 images per set,
56 classes), the mean loss of its last 5 logged steps (every 5 steps) and its wall time; it is
also written to WORK_DIR/table.md. `--reuse` keeps a finished run whose command is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/shapesworld-tiny.yaml"
WORLD = 2
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", str(WORLD), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
SETS = ("zeroshot", "zeroshot_heldout")


@dataclass
class Run:
    slug: str
    description: str
    launcher: list[str]
    overrides: list[str]
    wall_s: float = 0.0
    results: dict = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)
    """Logged loss by step."""

    def command(self, common: list[str], run_dir: Path) -> list[str]:
        launcher = self.launcher or [sys.executable]
        return [*launcher, "-m", "vlp", "train", RECIPE, *common, *self.overrides,
                f"output_dir={run_dir}"]

    @property
    def final_loss(self) -> float:
        last = [self.losses[s] for s in sorted(self.losses)[-5:]]
        return sum(last) / len(last)


def plan(args: argparse.Namespace) -> list[Run]:
    accum, rest = divmod(args.global_batch, WORLD * args.micro_batch)
    if rest or accum < 2:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of {WORLD} × "
                         f"--micro-batch {args.micro_batch} with at least 2 micro-batches")
    g, m = args.global_batch, args.micro_batch
    micro = [f"data.batch_size={m}", f"train.grad_accum={accum}", "loss.backend=ring"]
    runs = [
        Run("one_process", f"1 process × {g}", [], [f"data.batch_size={g}"]),
        Run("ring", f"{WORLD} ranks × {g // WORLD}, ring", ACCELERATE,
            [f"data.batch_size={g // WORLD}", "loss.backend=ring"]),
        Run("ring_grad_cache", f"{WORLD} ranks × {accum} × {m}, ring, grad cache", ACCELERATE,
            [*micro, "train.grad_cache=true"]),
    ]
    if args.plain_accum:
        runs.append(Run("ring_plain_accum", f"{WORLD} ranks × {accum} × {m}, ring, plain "
                        f"accumulation (contrastive batch {WORLD * m})", ACCELERATE, micro))
    return runs


def execute(run: Run, common: list[str], run_dir: Path, *, reuse: bool) -> None:
    cmd = shlex.join(run.command(common, run_dir))
    done = run_dir / "benchmark_run.json"
    if reuse and done.is_file() and json.loads(done.read_text())["command"] == cmd:
        print(f"reusing {run_dir}", flush=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
        print(f"[{time.strftime('%H:%M:%S')}] {run.slug}: {cmd}", flush=True)
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        start = time.perf_counter()
        proc = subprocess.run(shlex.split(cmd), cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{run.slug} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        done.write_text(json.dumps({"command": cmd, "wall_s": time.perf_counter() - start}))
    run.wall_s = json.loads(done.read_text())["wall_s"]
    run.results = json.loads((run_dir / "results.json").read_text())
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            run.losses[record["step"]] = record["loss"]


def table(runs: list[Run]) -> str:
    lines = ["| run | zeroshot acc1 / acc5 | zeroshot_heldout acc1 / acc5 | loss (last 5 logs) "
             "| wall |", "|---|---|---|---:|---:|"]
    for run in runs:
        sets = [f"{run.results[s]['acc1']:.3f} / {run.results[s]['acc5']:.3f}" for s in SETS]
        lines.append(f"| {run.description} | {sets[0]} | {sets[1]} | {run.final_loss:.3f} | "
                     f"{run.wall_s / 60:.1f} min |")
    return "\n".join(lines)


def same_samples_agreement(runs: list[Run]) -> str:
    by_slug = {run.slug: run for run in runs}
    ring, cached = by_slug["ring"].losses, by_slug["ring_grad_cache"].losses
    early = [s for s in sorted(ring) if s <= 20 and s in cached]
    diffs = [abs(ring[s] - cached[s]) for s in early]
    return (f"ring vs ring_grad_cache (same samples): logged loss at steps {early}: "
            f"{[round(ring[s], 4) for s in early]} vs {[round(cached[s], 4) for s in early]}; "
            f"largest difference {max(diffs):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=64, help="rows per rank per micro-batch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--model", help="model.name override (default: the recipe's)")
    parser.add_argument("--plain-accum", action="store_true",
                        help="also run 2 ranks with plain accumulation (no cache)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs in --work-dir whose command is unchanged")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "ring_grad_cache")
    args = parser.parse_args()

    common = [f"train.steps={args.steps}", f"optim.lr={args.lr}",
              f"optim.warmup_steps={args.warmup}", "train.log_every=5", "train.trackers=[jsonl]",
              f"checkpoint.every={args.steps}", "checkpoint.resume=never"]
    if args.model:
        common.append(f"model.name={args.model}")
    runs = plan(args)
    for run in runs:
        execute(run, common, args.work_dir / run.slug, reuse=args.reuse)
    result = "\n\n".join([table(runs), same_samples_agreement(runs)])
    print(result)
    header = (f"`python benchmarks/ring_grad_cache_shapesworld.py {shlex.join(sys.argv[1:])}`: "
              f"{RECIPE} with {shlex.join(common)}, global batch {args.global_batch}\n\n")
    (args.work_dir / "table.md").write_text(header + result + "\n")


if __name__ == "__main__":
    main()
