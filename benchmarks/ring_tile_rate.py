"""How close the ring loss's tiles run to this machine's matmul rate (one process, CPU time).

Shapes: B batch (one rank, so the ring is a single block), D feature dim, t tile size.

The ring's CLIP loss does 4 (B, D)×(D, B) matmul units per forward + backward (1 in the forward,
3 in the recomputing backward) and its SigLIP loss 3 (all in the forward); everything else is
element-wise work over the (t, t) tiles and O(B·D) vector work. This script times, interleaved
(loss, bare matmuls, loss, bare matmuls, ...), the loss's forward + backward and the same number
of bare tile matmuls, and prints the CPU time of each and the share of the loss's time the bare
matmuls account for ("matmul rate"): 100 % would mean the element-wise work is free.

    python benchmarks/ring_tile_rate.py [--batch 4096] [--dim 512] [--tiles 256,512,1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vlp.distributed import ring_clip_loss, ring_siglip_loss

MATMUL_UNITS = {"clip": 4, "siglip": 3}


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _bare_matmuls(x: torch.Tensor, y: torch.Tensor, tile: int, units: int) -> None:
    """`units` passes of (t, D)×(D, t) tile matmuls over the (B, B) matrix, results discarded."""
    out = torch.empty(tile, tile)
    for _ in range(units):
        for i in range(0, x.shape[0], tile):
            for j in range(0, y.shape[0], tile):
                a, b = x[i : i + tile], y[j : j + tile]
                torch.mm(a, b.T, out=out[: a.shape[0], : b.shape[0]])


def measure(kind: str, batch: int, dim: int, tile: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(30.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)

    def loss() -> None:
        if kind == "clip":
            ring_clip_loss(x, y, scale, tile_size=tile).backward()
        else:
            ring_siglip_loss(x, y, scale, bias, tile_size=tile).backward()

    def bare() -> None:
        _bare_matmuls(x.detach(), y.detach(), tile, MATMUL_UNITS[kind])

    loss(), bare()  # warm-up
    loss_s, bare_s = [], []
    for r in range(repeats):  # interleaved, order alternated
        first, second = (loss, bare) if r % 2 == 0 else (bare, loss)
        t1, t2 = _cpu_seconds(first), _cpu_seconds(second)
        loss_s.append(t1 if first is loss else t2)
        bare_s.append(t2 if first is loss else t1)
    rates = [b / a for a, b in zip(loss_s, bare_s, strict=True)]
    return {
        "kind": kind,
        "tile": tile,
        "loss_cpu_s": statistics.median(loss_s),
        "matmul_cpu_s": statistics.median(bare_s),
        "rate": statistics.median(rates),
        "rate_range": (min(rates), max(rates)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096, help="B (one rank)")
    parser.add_argument("--dim", type=int, default=512, help="D")
    parser.add_argument("--tiles", default="256,512,1024", help="tile sizes, comma-separated")
    parser.add_argument("--kinds", default="clip,siglip", help="clip and/or siglip")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved pairs per row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch}, "
        f"D={args.dim}, CPU time, median of {args.repeats} interleaved pairs"
    )
    print("| loss | tile | loss CPU s | bare matmuls CPU s | matmul rate (median) | range |")
    print("|---|---:|---:|---:|---:|---|")
    for kind in args.kinds.split(","):
        for tile in (int(t) for t in args.tiles.split(",")):
            r = measure(kind, args.batch, args.dim, tile, args.repeats)
            lo, hi = r["rate_range"]
            print(
                f"| {kind} | {tile} | {r['loss_cpu_s']:.3f} | {r['matmul_cpu_s']:.3f} | "
                f"{100 * r['rate']:.0f} % | {100 * lo:.0f}–{100 * hi:.0f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
