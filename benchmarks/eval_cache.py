"""What a repeated suite run costs: image decoding and text-tower time, run by run.

    python benchmarks/eval_cache.py [--model vlp-tiny-rn] [--runs 2] [--lock-text]
        [--suite shapesworld] [--only zeroshot,retrieval] [overrides ...]

Runs `evaluate_suite` `--runs` times in one process on one randomly initialised model (as a
training run's periodic evaluations do; `--lock-text` locks its text tower as LiT does) and
prints, per run: wall and CPU seconds of the whole suite, seconds spent reading, decoding and
preprocessing images (timers around the shard sample decoder and the image-file dataset, so
the suite's `num_workers` must be 0 for them to see the work), the text tower's forward
calls and seconds (hooks on the text transformer), and the decoded images kept for the next
run (`vlp.eval.cache.decoded_bytes`).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vlp.eval import benchmark_data, cache, embedding
from vlp.eval.runner import evaluate_suite
from vlp.eval.suite import load_suite
from vlp.models import build_model
from vlp.models.locking import lock_towers


class Timer:
    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed


def kept_mib() -> str:
    decoded_bytes = getattr(cache, "decoded_bytes", None)  # absent before the image cache
    return "-" if decoded_bytes is None else f"{decoded_bytes() / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vlp-tiny-rn")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--lock-text", action="store_true")
    parser.add_argument("--suite", default="shapesworld")
    parser.add_argument("--only", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    suite = load_suite(args.suite, overrides=args.overrides,
                       only=args.only.split(",") if args.only else None, progress=False)
    if suite.num_workers:
        raise SystemExit("the image timers need num_workers=0 (pass num_workers=0)")
    torch.manual_seed(0)
    bundle = build_model(args.model)
    model = bundle.model
    if args.lock_text:
        lock_towers(model, text=True)

    decode = Timer()
    benchmark_data._SampleDecoder.__call__ = decode.wrap(benchmark_data._SampleDecoder.__call__)
    embedding._ImageFiles.__getitem__ = decode.wrap(embedding._ImageFiles.__getitem__)
    text = Timer()
    starts: list[float] = []
    model.transformer.register_forward_pre_hook(
        lambda module, inputs: starts.append(time.perf_counter()))
    model.transformer.register_forward_hook(
        lambda module, inputs, output: setattr(text, "seconds",
                                               text.seconds + time.perf_counter() - starts.pop()))
    model.transformer.register_forward_hook(
        lambda module, inputs, output: setattr(text, "calls", text.calls + 1))

    print(f"model {args.model} (text tower {'locked' if args.lock_text else 'trainable'}), "
          f"suite {suite.name}: {', '.join(b.name for b in suite.benchmarks)}; "
          f"torch threads {torch.get_num_threads()}")
    print("| run | wall s | CPU s | images decoded | decode+preprocess s (share of wall) "
          "| text forwards | text tower s | decoded images kept MiB |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        for run in range(1, args.runs + 1):
            before = (decode.seconds, decode.calls, text.seconds, text.calls)
            wall, cpu = time.perf_counter(), time.process_time()
            evaluate_suite(model, bundle.tokenizer, bundle.preprocess_val, suite, out,
                           progress=False, write_files=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            decode_s, decoded = decode.seconds - before[0], decode.calls - before[1]
            print(f"| {run} | {wall:.1f} | {cpu:.1f} | {decoded} | {decode_s:.1f} "
                  f"({100 * decode_s / wall:.1f} %) | {text.calls - before[3]} "
                  f"| {text.seconds - before[2]:.1f} | {kept_mib()} |", flush=True)


if __name__ == "__main__":
    main()
