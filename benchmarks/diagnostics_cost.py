"""What the training diagnostics (`train.diagnostics_every`) cost per step.

    python benchmarks/diagnostics_cost.py [--model vlp-tiny] [--batch-size 64] [--pairs 5]
        [--block 4] [--interval 50] [--threads 1] [--repeats 20] [--work-dir DIR]

One `Trainer` on ShapesWorld (single process, fp32) runs blocks of `--block` optimizer steps,
alternately with diagnostics on every step (B) and off (A), in pairs A B, B A, A B, ... so that
load from other jobs hits both alike. Every step of both is followed by `Trainer.log` (what a
diagnostic step does: it is also a log step), so the difference is the diagnostics alone: their
computation on the last micro-batch's features, reading their scalars off the device, and the
TensorBoard histograms. The table gives each pair's per-step times and the extra cost of a
diagnostic step, then the share of step time at `--interval` (the extra cost spread over that
many steps): (B − A) / (interval · A). Times are the process's CPU time (all its threads; the
data worker is another process), which other jobs on the machine disturb less than wall time;
`--threads 1` keeps OpenMP from spinning while a descheduled thread catches up.

On a shared machine the step-to-step spread can exceed what the diagnostics cost, so the script
also times the diagnostics in isolation: `step_diagnostics` on a real last micro-batch's model
output plus reading its scalars and histograms off the device (what `Trainer.log` adds),
`--repeats` times, against the median step time of the A blocks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_trainer(args: argparse.Namespace, work_dir: Path):
    from vlp.config import load_config
    from vlp.train.trainer import Trainer

    cfg = load_config(None, [
        f"output_dir={work_dir / 'run'}", f"data.cache_dir={work_dir / 'cache'}",
        f"model.name={args.model}", "data.synth.num_train=4000", "data.synth.num_eval=32",
        "data.synth.samples_per_shard=1000", f"data.batch_size={args.batch_size}",
        "data.num_workers=1", "data.shuffle_buffer=500", "train.steps=100000",
        "train.trackers=[jsonl,tensorboard]", "checkpoint.every=100000"])
    cfg.validate()
    (work_dir / "run").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, work_dir / "run")
    trainer.restore()
    return trainer


def timed(fn: Callable[[], object]) -> float:
    """CPU seconds of `fn()` (the device finished before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.process_time() - start


def time_block(trainer, steps: int, *, diagnostics: bool) -> float:
    """Mean CPU seconds per step (step + log) over `steps` steps."""
    trainer.cfg.train.diagnostics_every = 1 if diagnostics else 0

    def run() -> None:
        for _ in range(steps):
            result = trainer.step()
            trainer.log(result)
            assert (result.diagnostics is not None) == diagnostics

    return timed(run) / steps


def time_diagnostics_alone(trainer, repeats: int) -> float:
    """Median CPU seconds of computing and reading one step's diagnostics."""
    from vlp.train.diagnostics import step_diagnostics
    from vlp.train.grad_cache import forward

    batch = next(trainer.batches)
    with torch.no_grad():
        output = forward(trainer.model, batch, trainer.accelerator.device)

    def once() -> None:
        diagnostics = step_diagnostics(output)
        torch.stack(list(diagnostics.scalars.values())).tolist()
        [values.cpu().numpy() for values in diagnostics.histograms.values()]

    return statistics.median(timed(once) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vlp-tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="vlp-diag-cost-"))
    trainer = build_trainer(args, work_dir)
    time_block(trainer, 2, diagnostics=True)  # warm-up: first steps, first histogram write
    time_block(trainer, 2, diagnostics=False)
    rows = []
    for pair in range(args.pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)
        times = {on: time_block(trainer, args.block, diagnostics=on) for on in order}
        rows.append((times[False], times[True]))
    alone = time_diagnostics_alone(trainer, args.repeats)
    trainer.accelerator.end_training()
    del trainer.batches  # stop the data worker now, not at interpreter exit
    device = trainer.accelerator.device
    print(f"{args.model}, batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, "
          f"{args.pairs} pairs of {args.block}-step blocks (step + log each step), CPU time\n")
    print("| pair | off (ms/step) | on every step (ms/step) | extra per diagnostic step (ms) "
          f"| share at interval {args.interval} |")
    print("|---:|---:|---:|---:|---:|")
    shares = []
    for i, (off, on) in enumerate(rows):
        share = (on - off) / (args.interval * off)
        shares.append(share)
        print(f"| {i} | {off * 1e3:.1f} | {on * 1e3:.1f} | {(on - off) * 1e3:+.1f} "
              f"| {share:+.3%} |")
    ratios = [on / off for off, on in rows]
    print(f"\nmedian on/off ratio (diagnostics every step): {statistics.median(ratios):.4f} "
          f"(range {min(ratios):.4f} to {max(ratios):.4f})")
    print(f"median share of step time at interval {args.interval}: "
          f"{statistics.median(shares):+.3%} (range {min(shares):+.3%} to {max(shares):+.3%})")
    step = statistics.median(off for off, _ in rows)
    print(f"\ndiagnostics alone: {alone * 1e3:.2f} ms (median of {args.repeats}) against a "
          f"median step of {step * 1e3:.1f} ms: {alone / step:.3%} of a step when on every step, "
          f"{alone / (args.interval * step):.4%} of step time at interval {args.interval}")


if __name__ == "__main__":
    main()
