"""Training throughput: `vlp train` against `open_clip_train.main` on the same job.

    python benchmarks/train_throughput.py [--steps 40] [--batch-size 128] [--workers 1]
        [--repeats 2] [--warmup 10] [--threads N] [--out table.md]

Both trainers run as single CPU processes in fp32 on the `vlp-tiny` model (64 px ViT, 4+4
layers; open_clip gets vlp's JSON config through `open_clip.add_model_config`), the CLIP loss,
AdamW with the same hyper-parameters and gradient clipping, the same batch size, data workers,
threads and number of steps, reading the very same ShapesWorld webdataset shards (generated
once into the cache) with shards drawn with replacement and a 5000-sample shuffle buffer.

Throughput is what each trainer logs itself, every 5 steps: vlp's `samples_per_s` records in
`metrics.jsonl`, open_clip's `Batch (t)` window averages in `out.log`. Windows that start
before `--warmup` steps are dropped; the rest give samples / seconds over the steady state.
Runs alternate (vlp first on even repeats, open_clip first on odd ones) so that load from other
jobs on the machine hits both alike; the table reports the median run of each trainer and the
ratio vlp / open_clip (>= 1.0 means vlp adds no overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "shapesworld-tiny.yaml"
MODEL = "vlp-tiny"
MODEL_JSON = REPO / "vlp" / "models" / "configs" / f"{MODEL}.json"
IMAGE_SIZE = 64
LOG_EVERY = 5
SHUFFLE_BUFFER = 5000  # open_clip_train's fixed _SAMPLE_SHUFFLE_SIZE
HYPER = {"lr": 1e-3, "wd": 0.1, "warmup": 50, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6,
         "grad_clip": 1.0}
OPEN_CLIP_WRAPPER = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)
OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([0-9.]+)")


def prepare_data(cache_dir: str, num_train: int) -> str:
    """Generate (or reuse) ShapesWorld shards; return the `::`-joined training shard spec."""
    from vlp.data.cache import prepare_shapesworld, train_shards_spec

    params = {"num_train": num_train, "num_eval": 100, "seed": 0, "image_size": IMAGE_SIZE,
              "samples_per_shard": 1000}
    return train_shards_spec(prepare_shapesworld(cache_dir, params, progress=False))


def vlp_command(args: argparse.Namespace, shards: str, out_dir: Path) -> list[str]:
    overrides = {
        "output_dir": out_dir, "data.synth": "", "data.shards": shards,
        "data.batch_size": args.batch_size, "data.num_workers": args.workers,
        "data.shuffle_buffer": SHUFFLE_BUFFER, "train.steps": args.steps,
        "train.log_every": LOG_EVERY, "train.trackers": "[jsonl]", "train.mixed_precision": "'no'",
        "optim.lr": HYPER["lr"], "optim.weight_decay": HYPER["wd"],
        "optim.warmup_steps": HYPER["warmup"], "optim.beta1": HYPER["beta1"],
        "optim.beta2": HYPER["beta2"], "optim.eps": HYPER["eps"],
        "optim.grad_clip": HYPER["grad_clip"], "model.name": MODEL,
        "checkpoint.every": 10**9, "checkpoint.resume": "never",
    }
    return [sys.executable, "-m", "vlp", "train", str(RECIPE),
            *(f"{k}={v}" for k, v in overrides.items())]


def open_clip_command(args: argparse.Namespace, shards: str, logs: Path, name: str) -> list[str]:
    flags = {
        "--train-data": shards, "--dataset-type": "webdataset",
        "--train-num-samples": args.steps * args.batch_size, "--batch-size": args.batch_size,
        "--workers": args.workers, "--model": MODEL, "--epochs": 1, "--device": "cpu",
        "--precision": "fp32", "--lr": HYPER["lr"], "--wd": HYPER["wd"],
        "--warmup": HYPER["warmup"], "--beta1": HYPER["beta1"], "--beta2": HYPER["beta2"],
        "--eps": HYPER["eps"], "--grad-clip-norm": HYPER["grad_clip"],
        "--log-every-n-steps": LOG_EVERY, "--logs": logs, "--name": name,
        "--save-frequency": 0, "--zeroshot-frequency": 0, "--val-frequency": 0,
        "--report-to": "", "--seed": 0,
    }
    argv = [str(x) for kv in flags.items() for x in kv]
    return [sys.executable, "-c", OPEN_CLIP_WRAPPER, str(MODEL_JSON), *argv,
            "--dataset-resampled"]


def run(cmd: list[str], log_path: Path, env: dict[str, str]) -> float:
    """Run one trainer, its output to `log_path`; return the wall-clock seconds it took."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return time.perf_counter() - start


Window = tuple[int, int, float]
"""A log window: the first and last optimizer step it covers and the seconds they took."""


def vlp_windows(metrics: Path, batch_size: int) -> list[Window]:
    """Windows from vlp's metrics.jsonl (`samples_per_s` is over the steps since the last log)."""
    windows, prev = [], 0
    for line in metrics.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "samples_per_s" in record:
            step = record["step"]
            windows.append((prev + 1, step, (step - prev) * batch_size / record["samples_per_s"]))
            prev = step
    return windows


def open_clip_windows(out_log: Path, batch_size: int) -> list[Window]:
    """Windows from open_clip's out.log (`Batch (t)` is the mean step time since the last log)."""
    windows, prev = [], 0
    for match in OPEN_CLIP_LINE.finditer(out_log.read_text()):
        step = int(match.group(1)) // batch_size
        windows.append((prev + 1, step, (step - prev) * float(match.group(2))))
        prev = step
    return windows


def steady_rate(windows: list[Window], warmup: int, batch_size: int, what: str) -> float:
    """samples/s over the windows that start after step `warmup`."""
    kept = [(last - first + 1, secs) for first, last, secs in windows if first > warmup]
    if not kept:
        raise SystemExit(f"{what}: no log window starts after step {warmup}; raise --steps")
    return batch_size * sum(n for n, _ in kept) / sum(s for _, s in kept)


def run_vlp(args: argparse.Namespace, shards: str, work: Path, i: int,
            env: dict[str, str]) -> float:
    out_dir = work / f"vlp-{i}"
    run(vlp_command(args, shards, out_dir), work / f"vlp-{i}.log", env)
    windows = vlp_windows(out_dir / "metrics.jsonl", args.batch_size)
    return steady_rate(windows, args.warmup, args.batch_size, f"vlp run {i}")


def run_open_clip(args: argparse.Namespace, shards: str, work: Path, i: int,
                  env: dict[str, str]) -> float:
    name = f"open_clip-{i}"
    run(open_clip_command(args, shards, work, name), work / f"{name}.log", env)
    windows = open_clip_windows(work / name / "out.log", args.batch_size)
    return steady_rate(windows, args.warmup, args.batch_size, f"open_clip run {i}")


TRAINERS = {"vlp": run_vlp, "open_clip": run_open_clip}


def measure(args: argparse.Namespace, shards: str, work: Path) -> dict[str, list[float]]:
    """samples/s of every run, alternating which trainer goes first."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    rates: dict[str, list[float]] = {name: [] for name in TRAINERS}
    for i in range(args.repeats):
        order = list(TRAINERS) if i % 2 == 0 else list(reversed(TRAINERS))
        for name in order:
            rates[name].append(TRAINERS[name](args, shards, work, i, env))
            print(f"  run {i} {name:<9} {rates[name][-1]:8.1f} samples/s", flush=True)
    return rates


def table(rates: dict[str, list[float]]) -> str:
    base = statistics.median(rates["open_clip"])
    lines = ["| trainer | samples/s (median) | runs | ratio |", "|---|---:|---|---:|"]
    for name, values in rates.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {name} | {median:.1f} | {runs} | {median / base:.2f}x |")
    return "\n".join(lines)


def versions() -> str:
    import accelerate
    import open_clip
    import torch
    import webdataset

    import vlp

    return (f"python {sys.version.split()[0]}, torch {torch.__version__}, open_clip "
            f"{open_clip.__version__}, webdataset {webdataset.__version__}, accelerate "
            f"{accelerate.__version__}, vlp {vlp.__version__}; {os.cpu_count()} CPUs, "
            f"torch threads {torch.get_num_threads()}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="data loader workers (both)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for both trainers (0 = torch's default)")
    parser.add_argument("--num-train", type=int, default=10_000, help="ShapesWorld samples")
    parser.add_argument("--cache-dir", default="~/.cache/vlp", help="ShapesWorld cache")
    parser.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args()
    if args.steps % max(1, args.workers):
        parser.error("--steps must be a multiple of --workers (open_clip splits the epoch "
                     "evenly across workers)")
    if args.warmup >= args.steps - LOG_EVERY:
        parser.error(f"--warmup must leave at least one {LOG_EVERY}-step log window")
    return args


def main() -> None:
    args = parse_args()
    shards = prepare_data(args.cache_dir, args.num_train)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        work = Path(tmp)
        print(versions())
        print(f"SHARDS={shards}")
        print("commands (run i):")
        for cmd in (vlp_command(args, shards, work / "vlp-i"),
                    open_clip_command(args, shards, work, "open_clip-i")):
            print("  " + shlex.join(cmd).replace(shards, '"$SHARDS"'))
        rates = measure(args, shards, work)
    title = (f"Training throughput, vlp-tiny fp32 on CPU: batch {args.batch_size}, "
             f"{IMAGE_SIZE} px, {args.workers} data worker(s), {args.steps} steps "
             f"(first {args.warmup} left out), {args.repeats} run(s) each")
    text = f"{title}\n\n{table(rates)}\n"
    print()
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
