"""One-GPU device check: mixed precision, the tiled loss against open_clip, training speed, NCCL.

    python benchmarks/device_check.py            # one GPU; sized for <= 8 minutes, not yet timed
    python benchmarks/device_check.py --tiny     # tiny sizes on CPU (4–6 min on a busy 2-core box)

Prints one Markdown table, a row per check, each with its status (ok / FAIL / skipped and why),
and exits non-zero if a check failed:

- tiny recipe in fp32, bf16 and fp16: `vlp train recipes/shapesworld-tiny.yaml` as three
  subprocesses run at once (without OMP_NUM_THREADS, each gets a third of the cores), with
  `train.mixed_precision` set, on the same shards, seed and steps; every loss
  must be finite and the curve within --curve-tolerance (relative, step by step) of fp32's.
  A precision the device or accelerate refuses (fp16 on CPU) is reported in its row.
- tiled loss vs open_clip in one process: `ring_clip_loss` vs `ClipLoss` and `ring_siglip_loss`
  vs `SigLipLoss`, forward + backward at growing global batches up to the largest that fits
  (open_clip's out-of-memory is reported, the ring goes on): the loss values must agree, and
  the row gives peak memory (CUDA: max_memory_allocated; CPU: resident-set high-water mark)
  and time (wall on a GPU, CPU time on CPU), with the ratios open_clip ÷ vlp (> 1: vlp uses
  less / is faster). Times are the median of back-to-back pairs whose order alternates.
- `vlp train` vs `python -m open_clip_train.main` samples/s on the same model and shards,
  through benchmarks/train_throughput.py (per-pair ratios; ViT-B-32 at 224 px on a GPU).
- NCCL initialisation with one process, and one all_reduce (skipped without CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

import loss_memory  # noqa: E402  (benchmarks/ is not a package)
import train_throughput  # noqa: E402

PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class Sizes:
    """Everything --tiny shrinks."""

    recipe_steps: int
    recipe_batch: int
    num_train: int
    loss_batches: tuple[int, ...]
    loss_dim: int
    loss_repeats: int
    train_args: tuple[str, ...]


TINY = Sizes(
    recipe_steps=6,
    recipe_batch=16,
    num_train=400,
    loss_batches=(256, 1024),
    loss_dim=64,
    loss_repeats=2,
    train_args=("--model", "vlp-tiny", "--image-size", "64", "--steps", "10", "--warmup", "5",
                "--batch-size", "16", "--repeats", "1", "--num-train", "400"),
)
FULL = Sizes(
    recipe_steps=60,
    recipe_batch=128,
    num_train=8000,
    loss_batches=(4096, 16384, 32768, 65536, 131072),
    loss_dim=512,
    loss_repeats=3,
    train_args=("--model", "ViT-B-32", "--image-size", "224", "--steps", "60", "--warmup",
                "20", "--batch-size", "128", "--workers", "4", "--repeats", "2",
                "--num-train", "8000"),
)


@dataclass
class Row:
    check: str
    setting: str
    result: str
    status: str  # "ok", "FAIL: ...", "skipped: ..."


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tail(text: str, lines: int = 1) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(kept[-lines:]).replace("|", "\\|")[:300]


# ---------------------------------------------------------------- tiny recipe, three precisions


def _start_recipe(precision: str, shards: str, out: Path, s: Sizes,
                  threads: int | None) -> subprocess.Popen:
    """Start `vlp train` on the tiny recipe in `precision` (see `_recipe_losses`)."""
    overrides = {
        "output_dir": out, "data.synth": "", "data.shards": shards,
        "data.batch_size": s.recipe_batch, "data.num_workers": 0, "data.shuffle_buffer": 100,
        "train.steps": s.recipe_steps, "train.log_every": 1, "train.trackers": "[jsonl]",
        "train.mixed_precision": f"'{precision}'", "train.seed": 0, "checkpoint.every": 10**9,
        "checkpoint.resume": "never",
    }
    cmd = [sys.executable, "-m", "vlp", "train", str(train_throughput.RECIPE),
           *(f"{k}={v}" for k, v in overrides.items())]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with _log_path(out).open("w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _log_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.log")


def _recipe_losses(proc: subprocess.Popen, out: Path) -> list[float] | str:
    """The run's logged losses, or the last line it printed when it failed."""
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.returncode != 0:
        return _tail(_log_path(out).read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    return [r["loss"] for r in records if "loss" in r]


def _threads_each(runs: int) -> int | None:
    """CPU threads per concurrent run when OMP_NUM_THREADS is unset: the cores shared out, so
    that the runs together do not oversubscribe them (None: keep what the environment says)."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // runs)


def check_precisions(s: Sizes, shards: str, work: Path, tolerance: float) -> list[Row]:
    """The three runs train at once (they only compare losses, not speed), then are compared."""
    rows, reference = [], None
    setting = f"{s.recipe_steps} steps, batch {s.recipe_batch}, {_device()}"
    names = {precision: {"no": "fp32"}.get(precision, precision) for precision in PRECISIONS}
    threads = _threads_each(len(PRECISIONS))
    procs = {}
    try:
        for precision, name in names.items():
            procs[precision] = _start_recipe(precision, shards, work / f"recipe-{name}", s,
                                             threads)
        losses_of = {precision: _recipe_losses(procs[precision], work / f"recipe-{name}")
                     for precision, name in names.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for precision, name in names.items():
        losses = losses_of[precision]
        if isinstance(losses, str):
            rows.append(Row(f"tiny recipe {name}", setting, losses, f"FAIL: {name} run failed"))
            continue
        shown = ", ".join(f"{v:.3f}" for v in losses)
        if not losses or not all(math.isfinite(v) for v in losses):
            rows.append(Row(f"tiny recipe {name}", setting, shown, "FAIL: non-finite loss"))
            continue
        if reference is None:
            reference = losses
            rows.append(Row(f"tiny recipe {name}", setting, f"losses {shown}", "ok"))
            continue
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=False))
        status = "ok" if worst <= tolerance and len(losses) == len(reference) else (
            f"FAIL: {worst:.1%} from fp32 (tolerance {tolerance:.0%})")
        note = "; identical to fp32: no autocast on this device" if losses == reference else ""
        rows.append(Row(f"tiny recipe {name}", setting,
                        f"losses {shown}; at most {worst:.2%} from fp32{note}", status))
    return rows


# ---------------------------------------------------------------- tiled loss vs open_clip


def _loss_fns(kind: str) -> dict[str, Callable]:
    from open_clip.loss import ClipLoss, SigLipLoss

    from vlp.distributed import ring_clip_loss, ring_siglip_loss

    if kind == "clip":
        return {"vlp": lambda x, y, sc, b: ring_clip_loss(x, y, sc),
                "open_clip": lambda x, y, sc, b: ClipLoss()(x, y, sc)}
    return {"vlp": lambda x, y, sc, b: ring_siglip_loss(x, y, sc, b),
            "open_clip": lambda x, y, sc, b: SigLipLoss()(x, y, sc, b)}


def _inputs(batch: int, dim: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    x, y = (F.normalize(torch.randn(batch, dim, generator=g, device=device), dim=-1)
            .requires_grad_() for _ in "xy")
    scale = torch.tensor(30.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return [x, y, scale, bias]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_mib(fn: Callable, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """(loss value, peak MiB that forward + backward adds)."""
    if torch.cuda.is_available():
        _sync()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn(*inputs)
        loss.backward()
        _sync()
        return loss.item(), (torch.cuda.max_memory_allocated() - before) / 2**20
    loss_memory._malloc_returns_freed_blocks(True)
    before = loss_memory._status_kib("VmRSS")
    loss_memory._reset_peak_rss()
    loss = fn(*inputs)
    loss.backward()
    peak = (loss_memory._status_kib("VmHWM") - before) / 1024
    loss_memory._malloc_returns_freed_blocks(False)  # time as a caching allocator would
    return loss.item(), peak


def _clock() -> Callable[[], float]:
    """Wall clock on a GPU; on CPU this process's CPU time, which other jobs disturb less."""
    return time.perf_counter if torch.cuda.is_available() else time.process_time


def _seconds(fn: Callable, inputs: list[torch.Tensor]) -> float:
    clock = _clock()
    _sync()
    start = clock()
    fn(*inputs).backward()
    _sync()
    return clock() - start


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def check_losses(s: Sizes) -> list[Row]:
    rows, device = [], _device()
    for kind in ("clip", "siglip"):
        fns, open_clip_fits = _loss_fns(kind), True
        for batch in s.loss_batches:
            setting = f"B={batch}, D={s.loss_dim}, fp32, {device}"
            names = ["vlp", "open_clip"] if open_clip_fits else ["vlp"]
            try:
                values, peaks, times = {}, {}, {n: [] for n in names}
                for name in names:
                    fns["vlp"](*_inputs(64, s.loss_dim, device)).backward()  # one-off buffers
                    try:
                        values[name], peaks[name] = _peak_mib(
                            fns[name], _inputs(batch, s.loss_dim, device))
                    except (torch.OutOfMemoryError, RuntimeError) as error:
                        if name == "vlp" or not _is_oom(error):
                            raise
                        open_clip_fits = False
                        names = ["vlp"]
                        times.pop("open_clip")
                        torch.cuda.empty_cache()
                for repeat in range(s.loss_repeats):
                    for name in names if repeat % 2 == 0 else names[::-1]:
                        times[name].append(_seconds(fns[name], _inputs(batch, s.loss_dim, device)))
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not _is_oom(error):
                    raise
                rows.append(Row(f"tiled {kind} loss vs open_clip", setting,
                                "vlp ring: out of memory", "skipped: largest size reached"))
                torch.cuda.empty_cache()
                break
            rows.append(_loss_row(kind, setting, values, peaks, times))
    return rows


def _loss_row(kind: str, setting: str, values: dict, peaks: dict, times: dict) -> Row:
    vlp_s = statistics.median(times["vlp"])
    if "open_clip" not in values:
        return Row(f"tiled {kind} loss vs open_clip", setting,
                   f"vlp {peaks['vlp']:.0f} MiB, {vlp_s * 1e3:.1f} ms; open_clip: out of memory; "
                   "loss difference: not compared",
                   "ok")
    ratios = [o / v for v, o in zip(times["vlp"], times["open_clip"], strict=True)]
    difference = abs(values["vlp"] - values["open_clip"])
    what = "time" if torch.cuda.is_available() else "CPU time"
    result = (f"memory {peaks['vlp']:.0f} vs {peaks['open_clip']:.0f} MiB "
              f"(open_clip ÷ vlp {peaks['open_clip'] / max(peaks['vlp'], 1e-3):.2f}); {what} "
              f"{vlp_s * 1e3:.1f} vs {statistics.median(times['open_clip']) * 1e3:.1f} ms "
              f"(open_clip ÷ vlp {statistics.median(ratios):.2f}, pairs "
              f"{min(ratios):.2f}–{max(ratios):.2f}); loss difference {difference:.1e}")
    tolerance = 1e-4 * max(1.0, abs(values["open_clip"]))
    status = "ok" if difference <= tolerance else f"FAIL: losses differ by {difference:.1e}"
    return Row(f"tiled {kind} loss vs open_clip", setting, result, status)


# ---------------------------------------------------------------- training throughput


def check_train_throughput(s: Sizes, work: Path) -> list[Row]:
    check = "vlp train vs open_clip_train.main"
    try:
        import open_clip_train  # noqa: F401
    except ImportError:
        return [Row(check, "", "open_clip_train not installed", "skipped: no open_clip_train")]
    out = work / "train_throughput.md"
    cmd = [sys.executable, str(BENCHMARKS / "train_throughput.py"), *s.train_args,
           "--device", _device(), "--work-dir", str(work / "train_throughput"), "--out", str(out),
           "--cache-dir", str(work / "cache")]
    setting = " ".join(s.train_args[:4] + ("fp32", _device()))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        return [Row(check, setting, _tail(proc.stdout + proc.stderr), "FAIL: benchmark failed")]
    summary = re.search(r"vlp ÷ open_clip samples/s \(wall clock\): (.*?); open_clip ÷ vlp CPU "
                        r"time per sample: (.*?)\. ", out.read_text())
    if summary is None:
        return [Row(check, setting, _tail(out.read_text()), "FAIL: no summary line")]
    return [Row(check, setting, f"vlp ÷ open_clip samples/s {summary.group(1)}; CPU time "
                f"open_clip ÷ vlp {summary.group(2)}", "ok")]


# ---------------------------------------------------------------- NCCL


def check_nccl() -> list[Row]:
    import torch.distributed as dist

    check = "NCCL init, 1 process"
    if not torch.cuda.is_available():
        return [Row(check, "", "no CUDA device", "skipped: no CUDA")]
    if not dist.is_nccl_available():
        return [Row(check, "", "torch built without NCCL", "FAIL: no NCCL")]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        try:
            value = torch.ones(4, device="cuda")
            dist.all_reduce(value)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            ok = bool((value == 1).all())
        finally:
            dist.destroy_process_group()
    version = ".".join(map(str, torch.cuda.nccl.version()))
    return [Row(check, f"NCCL {version}", f"init + all_reduce in {seconds:.2f} s",
                "ok" if ok else "FAIL: wrong all_reduce result")]


# ---------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    lines = ["| check | setting | result | status |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.setting} | {r.result} | {r.status} |" for r in rows]
    return "\n".join(lines)


def _guarded(name: str, fn: Callable[[], list[Row]]) -> list[Row]:
    """A check that crashes becomes a FAIL row, so the other checks still run."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - reported in the table
        traceback.print_exc()
        return [Row(name, "", _tail(f"{type(error).__name__}: {error}"), "FAIL: crashed")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU, tests)")
    parser.add_argument("--curve-tolerance", type=float, default=0.05,
                        help="largest relative loss difference from fp32, step by step")
    parser.add_argument("--skip", default="", help="checks to skip: precision,loss,train,nccl")
    parser.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args()
    sizes, skip = (TINY if args.tiny else FULL), set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"device check on {device}: torch {torch.__version__}, "
          f"{'tiny' if args.tiny else 'full'} sizes", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(tmp)
        if "precision" not in skip:
            shards = train_throughput.prepare_data(str(work / "cache"), sizes.num_train)
            rows += _guarded("tiny recipe", lambda: check_precisions(
                sizes, shards, work, args.curve_tolerance))
        if "loss" not in skip:
            rows += _guarded("tiled loss vs open_clip", lambda: check_losses(sizes))
        if "train" not in skip:
            rows += _guarded("vlp train vs open_clip_train.main",
                             lambda: check_train_throughput(sizes, work))
        if "nccl" not in skip:
            rows += _guarded("NCCL init, 1 process", check_nccl)
    text = table(rows)
    print(text)
    print(f"{time.perf_counter() - started:.0f} s in all")
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 1 if any(r.status.startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
