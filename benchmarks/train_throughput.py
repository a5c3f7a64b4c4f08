"""Training throughput: `vlp train` against `open_clip_train.main` on the same job.

    python benchmarks/train_throughput.py [--steps 30] [--batch-size 128] [--workers 1]
        [--repeats 3] [--warmup 10] [--threads N] [--out table.md] [--work-dir DIR]

Both trainers run as single CPU processes in fp32 on the `vlp-tiny` model (64 px ViT, 4+4
layers; open_clip gets vlp's JSON config through `open_clip.add_model_config`), the CLIP loss,
AdamW with the same hyper-parameters and gradient clipping, the same batch size, data workers,
threads and number of steps, reading the very same ShapesWorld webdataset shards (generated
once into the cache), shards drawn with replacement, 5000-sample shuffle buffer.

samples/s is what each trainer logs itself every 5 steps: vlp's `samples_per_s` in
`metrics.jsonl`, open_clip's `Batch (t)` window means in `out.log`. Windows that start within
the first `--warmup` steps are dropped; the rest give samples / seconds over the steady state.
CPU ms/sample is the CPU time of the trainer's process tree (main process and data workers, from
/proc, read every 0.1 s and noted as each log record appears) over the same windows. It moves
less than wall-clock rates when other jobs share the cores, but not nothing: OpenMP threads spin
while a descheduled peer catches up, so on an oversubscribed machine `--threads 1` gives the
steadier comparison.

Runs come in back-to-back pairs (A B, B A, A B, ...: vlp first in even pairs, open_clip first in
odd ones) so that load from other jobs hits both alike. The table gives every pair's ratios
(vlp ÷ open_clip samples/s, open_clip ÷ vlp CPU ms/sample; > 1 where vlp is faster) and their
median and range. A ratio is only ever taken within a pair: dividing one trainer's median by
the other's mixes runs from different load periods. Each run's line also gives the 1-min load
average around it.

vlp reads the shards through `data.shards`, so it skips its end-of-run zero-shot report; open_clip
needs `--dataset-resampled` to draw shards with replacement as vlp does, and a one-line patch for
webdataset >= 0.2.96 (see OPEN_CLIP_WRAPPER).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "shapesworld-tiny.yaml"
MODEL = "vlp-tiny"
MODEL_JSON = REPO / "vlp" / "models" / "configs" / f"{MODEL}.json"
IMAGE_SIZE = 64
LOG_EVERY = 5
POLL_S = 0.1
SHUFFLE_BUFFER = 5000  # open_clip_train's fixed _SAMPLE_SHUFFLE_SIZE
HYPER = {"lr": 1e-3, "wd": 0.1, "warmup": 50, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6,
         "grad_clip": 1.0}
# Registers vlp-tiny with open_clip, and works around open_clip_train's tar reader choking on
# the end-of-shard marker that webdataset >= 0.2.96 yields (open_clip#935, webdataset#384).
OPEN_CLIP_WRAPPER = (
    "import functools, sys, open_clip, open_clip_train.data as d, webdataset.tariterators as t; "
    "d.tar_file_expander = functools.partial(t.tar_file_expander, eof_value=None); "
    "open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; sys.exit(main(sys.argv[2:]))"
)
OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([0-9.]+)")

Window = tuple[int, int, float]
"""A log window: the first and last optimizer step it covers and the seconds they took."""


def prepare_data(cache_dir: str, num_train: int, image_size: int = IMAGE_SIZE) -> str:
    """Generate (or reuse) ShapesWorld shards; return the `::`-joined training shard spec."""
    from vlp.data.cache import prepare_shapesworld, train_shards_spec

    params = {"num_train": num_train, "num_eval": 100, "seed": 0, "image_size": image_size,
              "samples_per_shard": 1000}
    return train_shards_spec(prepare_shapesworld(cache_dir, params, progress=False))


# ---------------------------------------------------------------- the two command lines


def vlp_command(args: argparse.Namespace, shards: str, out_dir: Path) -> list[str]:
    overrides = {
        "output_dir": out_dir, "data.synth": "", "data.shards": shards,
        "data.batch_size": args.batch_size, "data.num_workers": args.workers,
        "data.shuffle_buffer": SHUFFLE_BUFFER, "train.steps": args.steps,
        "train.log_every": LOG_EVERY, "train.trackers": "[jsonl]", "train.mixed_precision": "'no'",
        "optim.lr": HYPER["lr"], "optim.weight_decay": HYPER["wd"],
        "optim.warmup_steps": HYPER["warmup"], "optim.beta1": HYPER["beta1"],
        "optim.beta2": HYPER["beta2"], "optim.eps": HYPER["eps"],
        "optim.grad_clip": HYPER["grad_clip"], "model.name": args.model,
        "checkpoint.every": 10**9, "checkpoint.resume": "never",
    }
    return [sys.executable, "-m", "vlp", "train", str(RECIPE),
            *(f"{k}={v}" for k, v in overrides.items())]


def open_clip_command(args: argparse.Namespace, shards: str, logs: Path, name: str) -> list[str]:
    flags = {
        "--train-data": shards, "--dataset-type": "webdataset",
        "--train-num-samples": args.steps * args.batch_size, "--batch-size": args.batch_size,
        "--workers": args.workers, "--model": args.model, "--epochs": 1, "--device": args.device,
        "--precision": "fp32", "--lr": HYPER["lr"], "--wd": HYPER["wd"],
        "--warmup": HYPER["warmup"], "--beta1": HYPER["beta1"], "--beta2": HYPER["beta2"],
        "--eps": HYPER["eps"], "--grad-clip-norm": HYPER["grad_clip"],
        "--log-every-n-steps": LOG_EVERY, "--logs": logs, "--name": name,
        "--save-frequency": 0, "--zeroshot-frequency": 0, "--val-frequency": 0,
        "--report-to": "", "--seed": 0,
    }
    argv = [str(x) for kv in flags.items() for x in kv]
    return [sys.executable, "-c", OPEN_CLIP_WRAPPER, str(model_json(args.model)), *argv,
            "--dataset-resampled"]


def model_json(model: str) -> Path:
    """The config open_clip registers: vlp's own for a vlp model, else vlp-tiny's (unused by an
    open_clip model)."""
    own = MODEL_JSON.with_name(f"{model}.json")
    return own if own.is_file() else MODEL_JSON


# ---------------------------------------------------------------- reading the trainers' logs


def vlp_windows(text: str, batch_size: int) -> list[Window]:
    """Windows from vlp's metrics.jsonl (`samples_per_s` is over the steps since the last log)."""
    windows, prev = [], 0
    for line in text.splitlines():
        record = json.loads(line) if line.strip() else {}
        if "samples_per_s" in record:
            step = record["step"]
            windows.append((prev + 1, step, (step - prev) * batch_size / record["samples_per_s"]))
            prev = step
    return windows


def open_clip_windows(text: str, batch_size: int) -> list[Window]:
    """Windows from open_clip's out.log (`Batch (t)` is the mean step time since the last log)."""
    windows, prev = [], 0
    for match in OPEN_CLIP_LINE.finditer(text):
        step = int(match.group(1)) // batch_size
        windows.append((prev + 1, step, (step - prev) * float(match.group(2))))
        prev = step
    return windows


def complete_lines(path: Path) -> str:
    """The file's text up to its last newline ('' while it does not exist)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ""
    return text[: text.rfind("\n") + 1]


# ---------------------------------------------------------------- running one trainer


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process ended meanwhile
    return total / os.sysconf("SC_CLK_TCK")


def run(cmd: list[str], log_path: Path, env: dict[str, str], progress: Path,
        count: Callable[[str], int]) -> list[float]:
    """Run one trainer; return its process tree's CPU seconds as each log record appeared."""
    marks: list[float] = []
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            seen = count(complete_lines(progress))
            if seen > len(marks):
                marks += [tree_cpu(proc.pid)] * (seen - len(marks))
            time.sleep(POLL_S)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    log_path.with_suffix(".cpu.json").write_text(json.dumps(marks))
    return marks


@dataclass
class Result:
    samples_per_s: float
    cpu_ms_per_sample: float


def steady(windows: list[Window], marks: list[float], args: argparse.Namespace,
           what: str) -> Result:
    """Rates over the windows that start after step `--warmup` (CPU: those seen while running)."""
    first = next((k for k, (start, _, _) in enumerate(windows) if start > args.warmup), None)
    last = min(len(windows), len(marks)) - 1  # the process may exit before the last poll
    if first is None or last < first:
        raise SystemExit(f"{what}: no log window starts after step {args.warmup}; raise --steps")

    def samples(kept: list[Window]) -> int:
        return args.batch_size * sum(end - start + 1 for start, end, _ in kept)

    rate = samples(windows[first:]) / sum(secs for _, _, secs in windows[first:])
    cpu = marks[last] - marks[first - 1]
    return Result(rate, 1000 * cpu / samples(windows[first:last + 1]))


def run_vlp(args: argparse.Namespace, shards: str, work: Path, i: int,
            env: dict[str, str]) -> Result:
    out_dir = work / f"vlp-{i}"
    shutil.rmtree(out_dir, ignore_errors=True)  # metrics.jsonl is appended to
    metrics = out_dir / "metrics.jsonl"

    def count(text: str) -> int:
        return len(vlp_windows(text, args.batch_size))

    marks = run(vlp_command(args, shards, out_dir), work / f"vlp-{i}.log", env, metrics, count)
    return steady(vlp_windows(metrics.read_text(), args.batch_size), marks, args, f"vlp run {i}")


def run_open_clip(args: argparse.Namespace, shards: str, work: Path, i: int,
                  env: dict[str, str]) -> Result:
    name = f"open_clip-{i}"
    shutil.rmtree(work / name, ignore_errors=True)  # open_clip refuses an existing run name
    out_log = work / name / "out.log"

    def count(text: str) -> int:
        return len(open_clip_windows(text, args.batch_size))

    cmd = open_clip_command(args, shards, work, name)
    marks = run(cmd, work / f"{name}.log", env, out_log, count)
    windows = open_clip_windows(out_log.read_text(), args.batch_size)
    return steady(windows, marks, args, f"open_clip run {i}")


TRAINERS = {"vlp": run_vlp, "open_clip": run_open_clip}


def measure(args: argparse.Namespace, shards: str, work: Path) -> dict[str, list[Result]]:
    """Every run's result, alternating which trainer goes first; prints each run's load."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    results: dict[str, list[Result]] = {name: [] for name in TRAINERS}
    for i in range(args.repeats):
        order = list(TRAINERS) if i % 2 == 0 else list(reversed(TRAINERS))
        for name in order:
            start, load = time.perf_counter(), os.getloadavg()[0]
            r = TRAINERS[name](args, shards, work, i, env)
            results[name].append(r)
            print(f"  run {i} {name:<9} {r.samples_per_s:6.1f} samples/s, "
                  f"{r.cpu_ms_per_sample:5.1f} CPU ms/sample | {time.perf_counter() - start:4.0f} s "
                  f"wall in all | 1-min load average {load:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after", flush=True)
    return results


# ---------------------------------------------------------------- report


def pair_ratios(results: dict[str, list[Result]]) -> tuple[list[float], list[float]]:
    """Per back-to-back pair: vlp ÷ open_clip samples/s, and open_clip ÷ vlp CPU ms/sample.

    Both are > 1 where vlp is faster. Ratios are taken within a pair (the two runs that ran
    next to each other under the same load) and only then summarised: a ratio of medians mixes
    runs from different load periods and can be far from every pair's ratio.
    """
    pairs = list(zip(results["vlp"], results["open_clip"], strict=True))
    rate = [v.samples_per_s / o.samples_per_s for v, o in pairs]
    cpu = [o.cpu_ms_per_sample / v.cpu_ms_per_sample for v, o in pairs]
    return rate, cpu


def summary(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f}x (pairs {min(ratios):.2f}–{max(ratios):.2f})"


def table(results: dict[str, list[Result]]) -> str:
    """One line per pair of runs, then the median and range of the per-pair ratios."""
    rate, cpu = pair_ratios(results)
    lines = ["| pair | first | vlp samples/s | open_clip samples/s | vlp ÷ open_clip "
             "| vlp CPU ms/sample | open_clip CPU ms/sample | open_clip ÷ vlp CPU |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, (v, o) in enumerate(zip(results["vlp"], results["open_clip"], strict=True)):
        first = "vlp" if i % 2 == 0 else "open_clip"
        lines.append(f"| {i} | {first} | {v.samples_per_s:.1f} | {o.samples_per_s:.1f} "
                     f"| {rate[i]:.2f}x | {v.cpu_ms_per_sample:.1f} | {o.cpu_ms_per_sample:.1f} "
                     f"| {cpu[i]:.2f}x |")
    lines += ["", f"vlp ÷ open_clip samples/s (wall clock): {summary(rate)}; "
              f"open_clip ÷ vlp CPU time per sample: {summary(cpu)}. Median and range of the "
              "per-pair ratios; > 1 means vlp is faster."]
    return "\n".join(lines)


def versions(threads: int) -> str:
    import accelerate
    import open_clip
    import torch
    import webdataset

    import vlp

    return (f"python {sys.version.split()[0]}, torch {torch.__version__}, open_clip "
            f"{open_clip.__version__}, webdataset {webdataset.__version__}, accelerate "
            f"{accelerate.__version__}, vlp {vlp.__version__}; {os.cpu_count()} CPUs, trainers' "
            f"torch threads {threads or f'{torch.get_num_threads()} (default)'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rates")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="data loader workers (both)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each trainer")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for both trainers (0 = torch's default)")
    parser.add_argument("--num-train", type=int, default=10_000, help="ShapesWorld samples")
    parser.add_argument("--model", default=MODEL,
                        help="model for both trainers (a vlp model such as vlp-tiny-rn, or an "
                             "open_clip name)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="ShapesWorld image size (each trainer resizes to its model's)")
    parser.add_argument("--device", default="cpu",
                        help="open_clip's --device (vlp takes accelerate's: the GPU if any)")
    parser.add_argument("--cache-dir", default="~/.cache/vlp", help="ShapesWorld cache")
    parser.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    parser.add_argument("--work-dir", type=Path,
                        help="keep the runs' logs and outputs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.steps % max(1, args.workers):
        parser.error("--steps must be a multiple of --workers (open_clip splits the epoch "
                     "evenly across workers)")
    if not 1 <= args.warmup <= args.steps - LOG_EVERY:
        parser.error(f"--warmup must be >= 1 and leave at least one {LOG_EVERY}-step log window")
    return args


def main() -> None:
    args = parse_args()
    shards = prepare_data(args.cache_dir, args.num_train, args.image_size)
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        work = Path(tmp) if args.work_dir is None else args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
        print(versions(args.threads))
        print(f"SHARDS={shards}")
        print("commands (run i):")
        for cmd in (vlp_command(args, shards, work / "vlp-i"),
                    open_clip_command(args, shards, work, "open_clip-i")):
            print("  " + shlex.join(cmd).replace(shards, '"$SHARDS"'))
        results = measure(args, shards, work)
    title = (f"Training throughput, {args.model} fp32 on {args.device}: batch "
             f"{args.batch_size}, {args.image_size} px shards, {args.workers} data worker(s), torch threads "
             f"{args.threads or 'default'}, {args.steps} steps "
             f"(first {args.warmup} left out), {args.repeats} run(s) each")
    text = f"{title}\n\n{table(results)}\n"
    print()
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
