"""Peak memory and time of the contrastive loss (forward + backward): vlp ring vs open_clip.

Shapes: W ranks (gloo, CPU), B global batch, b = B / W local batch, D feature dim, t tile size.

For every world size one gloo group is spawned; in it, for every global batch size and method,
each rank builds random normalised (b, D) features, then measures
- peak memory: the process's resident-set high-water mark (Linux VmHWM, reset through
  /proc/self/clear_refs just before the loss) minus the resident set before the loss, with
  glibc told to return freed blocks > 64 KiB to the OS, so the peak is what the loss adds;
- time: after all memory measurements, wall-clock (slowest rank) and CPU time (summed over
  ranks, robust to other load on the machine) of forward + backward, with glibc keeping freed
  blocks for reuse (as it does once its dynamic mmap threshold has grown, and as a GPU caching
  allocator does); the same settings for both methods. vlp and open_clip are timed in
  back-to-back pairs, --repeats pairs per (loss, B), the order alternated (vlp first in even
  pairs, open_clip first in odd ones); the table gives each method's median and the median and
  range of the per-pair time ratios, so that load from other jobs hits both alike.
Each method runs once on a tiny batch first, so one-off buffers (BLAS, gloo) are not counted.
Methods: vlp `ring_clip_loss` vs open_clip `ClipLoss(local_loss=True, gather_with_grad=True)`,
and vlp `ring_siglip_loss` vs open_clip `SigLipLoss` (bidir). A configuration whose predicted
memory (all ranks together) exceeds --memory-budget-gib is skipped, never attempted.

    python benchmarks/loss_memory.py                  # B = 1k, 4k, 16k, 32k on W = 2 and 4
    python benchmarks/loss_memory.py --sizes 1024,2048,4096,8192,16384,24576,32768
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlp.distributed import DEFAULT_TILE_SIZE, ring_clip_loss, ring_siglip_loss

GIB = 1 << 30
MIB = 1 << 20
FLOAT_BYTES = 4
METHODS = ("vlp-ring-clip", "open_clip-ClipLoss", "vlp-ring-siglip", "open_clip-SigLipLoss")
PAIRS = {
    "softmax": ("vlp-ring-clip", "open_clip-ClipLoss"),
    "sigmoid": ("vlp-ring-siglip", "open_clip-SigLipLoss"),
}


@dataclass(frozen=True)
class Setting:
    world_size: int
    dim: int
    tile_size: int
    memory_budget_gib: float
    repeats: int


@dataclass
class Row:
    method: str
    world_size: int
    global_batch: int
    predicted_mib: float
    peak_mib: float | None = None  # largest over ranks
    wall_s: list[float] = field(default_factory=list)  # slowest rank, one per pair
    cpu_s: list[float] = field(default_factory=list)  # CPU time summed over ranks, one per pair
    skipped: str = ""


def predicted_bytes(method: str, global_batch: int, s: Setting) -> float:
    """A generous per-rank estimate of what the loss adds, used only to skip what cannot fit."""
    b = global_batch // s.world_size
    features = b * s.dim * FLOAT_BYTES
    if method.startswith("vlp"):
        return 24 * features + 10 * s.tile_size**2 * FLOAT_BYTES
    # open_clip holds (b, B) logits, their log-softmax / logsigmoid and gradients at once
    # (about 4.3 such matrices measured at B = 16k).
    return 6 * b * global_batch * FLOAT_BYTES + 8 * global_batch * s.dim * FLOAT_BYTES


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _malloc_returns_freed_blocks(enabled: bool) -> None:
    """glibc: give blocks > 64 KiB back to the OS on free (True) or keep them for reuse."""
    libc = _libc()
    libc.mallopt(-3, 64 * 1024 if enabled else 64 * MIB)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024 if enabled else GIB)  # M_TRIM_THRESHOLD
    if enabled:
        libc.malloc_trim(0)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _loss_fn(method: str, group_rank: int, world_size: int, tile_size: int) -> Callable:
    if method == "vlp-ring-clip":
        return lambda x, y, s, _: ring_clip_loss(x, y, s, tile_size=tile_size)
    if method == "vlp-ring-siglip":
        return lambda x, y, s, bias: ring_siglip_loss(x, y, s, bias, tile_size=tile_size)
    from open_clip.loss import ClipLoss, SigLipLoss

    if method == "open_clip-ClipLoss":
        loss = ClipLoss(
            local_loss=True, gather_with_grad=True, rank=group_rank, world_size=world_size
        )
        return lambda x, y, s, _: loss(x, y, s)
    loss = SigLipLoss(rank=group_rank, world_size=world_size, dist_impl="bidir")
    return lambda x, y, s, bias: loss(x, y, s, bias)


def _inputs(b: int, dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07).log().exp().requires_grad_()
    bias = torch.tensor(-10.0, requires_grad=True)
    return [x, y, scale, bias]


def _peak_mib(row: Row, s: Setting, rank: int) -> float:
    """Resident memory one forward+backward adds at its peak, on this rank."""
    fn = _loss_fn(row.method, rank, s.world_size, s.tile_size)
    inputs = _inputs(row.global_batch // s.world_size, s.dim, seed=rank)
    gc.collect()
    _malloc_returns_freed_blocks(True)
    dist.barrier()
    before_kib = _status_kib("VmRSS")
    _reset_peak_rss()
    fn(*inputs).backward()
    return (_status_kib("VmHWM") - before_kib) / 1024


def _seconds(row: Row, s: Setting, rank: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward+backward on this rank, started after a barrier."""
    fn = _loss_fn(row.method, rank, s.world_size, s.tile_size)
    inputs = _inputs(row.global_batch // s.world_size, s.dim, seed=rank)
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*inputs).backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def _over_ranks(value: float, op: dist.ReduceOp.RedOpType) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.item()


def _planned_rows(s: Setting, sizes: list[int]) -> list[Row]:
    rows = []
    for global_batch in sizes:
        for method in METHODS:
            predicted = predicted_bytes(method, global_batch, s)
            row = Row(method, s.world_size, global_batch, predicted / MIB)
            if predicted * s.world_size > s.memory_budget_gib * GIB:
                row.skipped = f"predicted {predicted * s.world_size / GIB:.1f} GiB"
            rows.append(row)
    return rows


def _rank_main(rank: int, s: Setting, sizes: list[int], store: str, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // s.world_size))
    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's all_gather
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=s.world_size
    )
    rows = _planned_rows(s, sizes)
    runnable = [r for r in rows if not r.skipped]
    for method in METHODS:  # first calls allocate one-off buffers (BLAS, gloo): not the loss's
        _seconds(Row(method, s.world_size, 64 * s.world_size, 0.0), s, rank)
    # All memory first: timing lets glibc keep freed blocks, which would hide later peaks.
    for row in runnable:
        row.peak_mib = _over_ranks(_peak_mib(row, s, rank), dist.ReduceOp.MAX)
        _progress(rank, f"memory {row.method} W={row.world_size} B={row.global_batch}")
    _malloc_returns_freed_blocks(False)
    by_key = {(r.method, r.global_batch): r for r in runnable}
    for ours, theirs in PAIRS.values():
        for global_batch in sizes:
            pair = [by_key.get((m, global_batch)) for m in (ours, theirs)]
            for repeat in range(s.repeats):
                for row in pair if repeat % 2 == 0 else pair[::-1]:
                    if row is None:
                        continue
                    wall, cpu = _seconds(row, s, rank)
                    row.wall_s.append(_over_ranks(wall, dist.ReduceOp.MAX))
                    row.cpu_s.append(_over_ranks(cpu, dist.ReduceOp.SUM))
            _progress(rank, f"time {ours} / {theirs} W={s.world_size} B={global_batch}")
    dist.destroy_process_group()
    if rank == 0:
        for row in rows:
            print(_describe(row), flush=True)
        Path(out).write_text(json.dumps([asdict(r) for r in rows]))


def _progress(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _describe(row: Row) -> str:
    what = f"W={row.world_size} B={row.global_batch:>6} {row.method:<22}"
    if row.skipped:
        return f"{what} skipped ({row.skipped})"
    return (
        f"{what} peak {row.peak_mib:9.1f} MiB (predicted {row.predicted_mib:9.1f})  "
        f"wall {_fmt(_median(row.wall_s), '8.3f')} s  CPU {_fmt(_median(row.cpu_s), '8.3f')} s"
    )


def run_world(s: Setting, sizes: list[int]) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(
            _rank_main,
            args=(s, sizes, os.path.join(tmp, "store"), out),
            nprocs=s.world_size,
            start_method="spawn",
        )
        return [Row(**r) for r in json.loads(Path(out).read_text())]


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "—" if not (numerator and denominator) else f"{numerator / denominator:.2f}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _pair_ratios(ours: list[float], theirs: list[float]) -> str:
    """Median (range) of ours ÷ theirs over the back-to-back pairs."""
    if not ours or len(ours) != len(theirs):
        return "—"
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def markdown_table(rows: list[Row]) -> str:
    """One line per (loss, W, B): vlp vs open_clip memory and time, and their ratios."""
    by_key = {(r.method, r.world_size, r.global_batch): r for r in rows}
    lines = [
        "| loss | W | B | vlp MiB | open_clip MiB | open_clip ÷ vlp memory | vlp wall s | "
        "open_clip wall s | vlp ÷ open_clip wall (pairs) | vlp CPU s | open_clip CPU s | "
        "vlp ÷ open_clip CPU (pairs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, (ours, theirs) in PAIRS.items():
        for w, batch in sorted({(r.world_size, r.global_batch) for r in rows}):
            a, o = by_key[(ours, w, batch)], by_key[(theirs, w, batch)]
            theirs_mem = f"skipped: {o.skipped}" if o.skipped else _fmt(o.peak_mib, ".0f")
            lines.append(
                f"| {kind} | {w} | {batch} | {_fmt(a.peak_mib, '.0f')} | {theirs_mem} | "
                f"{_ratio(o.peak_mib, a.peak_mib)} | {_fmt(_median(a.wall_s), '.2f')} | "
                f"{_fmt(_median(o.wall_s), '.2f')} | {_pair_ratios(a.wall_s, o.wall_s)} | "
                f"{_fmt(_median(a.cpu_s), '.2f')} | {_fmt(_median(o.cpu_s), '.2f')} | "
                f"{_pair_ratios(a.cpu_s, o.cpu_s)} |"
            )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in METHODS:
        for w in sorted({r.world_size for r in rows}):
            done = [r for r in rows if r.method == method and r.world_size == w and r.peak_mib]
            if not done:
                continue
            batch = [r.global_batch for r in done]
            style = "-" if method.startswith("vlp") else "--"
            mem_ax.plot(
                batch, [r.peak_mib for r in done], style, marker="o", label=f"{method} W={w}"
            )
            cpu = [_median(r.cpu_s) for r in done]
            time_ax.plot(batch, cpu, style, marker="o", label=f"{method} W={w}")
    for ax, label in (
        (mem_ax, "peak memory added per rank (MiB)"),
        (time_ax, "CPU seconds, all ranks"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch B")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    mem_ax.legend(fontsize=7)
    mem_ax.set_title("loss forward+backward memory (gloo, CPU)")
    time_ax.set_title("loss forward+backward time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=_int_list,
        default=[1024, 4096, 16384, 32768],
        help="global batch sizes, comma-separated",
    )
    parser.add_argument(
        "--world-sizes", type=_int_list, default=[2, 4], help="gloo world sizes, comma-separated"
    )
    parser.add_argument("--dim", type=int, default=512, help="feature dim D")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed vlp/open_clip pairs per (loss, B), order alternated",
    )
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE, help="vlp ring tile")
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=14.0,
        help="skip configs whose predicted memory (all ranks) exceeds this",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="folder for loss_memory.md, loss_memory.json and loss_memory.png",
    )
    args = parser.parse_args()
    for w in args.world_sizes:
        bad = [b for b in args.sizes if b % w]
        if bad:
            parser.error(f"--sizes {bad} are not divisible by world size {w}")

    rows: list[Row] = []
    for w in args.world_sizes:
        setting = Setting(w, args.dim, args.tile_size, args.memory_budget_gib, args.repeats)
        rows += run_world(setting, args.sizes)

    table = markdown_table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    versions = (
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, D={args.dim}, "
        f"tile {args.tile_size}"
    )
    command = "python benchmarks/loss_memory.py " + " ".join(sys.argv[1:])
    (args.out / "loss_memory.md").write_text(f"`{command}`\n\n{versions}\n\n{table}\n")
    (args.out / "loss_memory.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    plot(rows, args.out / "loss_memory.png")
    print(f"wrote {args.out / 'loss_memory.md'} and {args.out / 'loss_memory.png'}")


if __name__ == "__main__":
    main()
