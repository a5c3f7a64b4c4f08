"""Zero-shot evaluation throughput: vlp vs clip_benchmark on the same model, data and batch size.

    python benchmarks/eval_throughput.py [--model vlp-tiny] [--num-images 2000] [--batch-size 256]
        [--num-workers 0] [--repeats 3] [--device cpu|cuda]

Both sides read the same CLIP_benchmark-layout root (ShapesWorld's zero-shot set: 56 classes x 6
prompts) with their own data loader: vlp's `evaluate_zeroshot`, and clip_benchmark's
`zeroshot_classification.evaluate` fed by its `build_wds_dataset` + DataLoader, as its CLI
builds them for `wds/` datasets. Both run in fp32 without autocast, after one warm-up run.
"images/s" counts the whole call (class prompts, decoding, preprocessing, the image tower,
scoring); "class prompts s" times building the classifier alone (vlp encodes the prompts in
batches of --batch-size, clip_benchmark one class at a time); "image pass images/s" times the
images alone, given a ready classifier (vlp's `iter_batches` + `encode_images`, as
`predict_zeroshot` runs them; clip_benchmark's `run_classification`). The calls alternate
within each round so that changes in machine load hit both sides alike. Prints one table with
the ratios vlp / clip_benchmark and checks that both give the same acc1.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from vlp.data.shapesworld_writer import write_shapesworld
from vlp.eval.benchmark_data import iter_batches, read_benchmark
from vlp.eval.zeroshot import encode_images, eval_mode, evaluate_zeroshot, zero_shot_classifier
from vlp.models import build_model


def clip_benchmark_loader(root: Path, preprocess, *, batch_size: int, num_workers: int):
    """The DataLoader clip_benchmark's CLI builds for a `wds/` dataset."""
    from clip_benchmark.datasets.builder import build_wds_dataset

    dataset = build_wds_dataset("shapesworld", transform=preprocess, split="test",
                                data_dir=str(root))
    return torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None,
                                       shuffle=False, num_workers=num_workers)


def clip_benchmark_evaluate(model, tokenizer, preprocess, root: Path, *, batch_size: int,
                            num_workers: int, device: str) -> dict[str, float]:
    from clip_benchmark.metrics import zeroshot_classification

    # clip-benchmark 1.6.2 calls float() on a one-element array, which NumPy >= 2.4 refuses.
    zeroshot_classification.float = _float_of_one_element
    benchmark = read_benchmark(root)
    loader = clip_benchmark_loader(root, preprocess, batch_size=batch_size,
                                   num_workers=num_workers)
    return zeroshot_classification.evaluate(model, loader, tokenizer, benchmark.classnames,
                                            benchmark.templates, device=device, amp=False)


def clip_benchmark_images(model, classifier, preprocess, root: Path, *, batch_size: int,
                          num_workers: int, device: str) -> None:
    from clip_benchmark.metrics import zeroshot_classification

    loader = clip_benchmark_loader(root, preprocess, batch_size=batch_size,
                                   num_workers=num_workers)
    zeroshot_classification.run_classification(model, classifier, loader, device, amp=False)


def vlp_images(model, classifier, preprocess, root: Path, *, batch_size: int, num_workers: int,
               device: str) -> None:
    benchmark = read_benchmark(root)
    with eval_mode(model):
        for images, _ in iter_batches(benchmark, preprocess, batch_size=batch_size,
                                      num_workers=num_workers):
            (100.0 * encode_images(model, images, device=device) @ classifier).cpu()


def _float_of_one_element(value):
    if isinstance(value, np.ndarray):
        return builtins.float(value.item())
    return builtins.float(value)


def vlp_evaluate(model, tokenizer, preprocess, root: Path, *, batch_size: int, num_workers: int,
                 device: str) -> dict[str, float]:
    return evaluate_zeroshot(model, tokenizer, preprocess, root, device=device,
                             batch_size=batch_size, num_workers=num_workers, progress=False)


def clip_benchmark_classifier(model, tokenizer, root: Path, *, batch_size: int, device: str):
    from clip_benchmark.metrics import zeroshot_classification

    benchmark = read_benchmark(root)
    return zeroshot_classification.zero_shot_classifier(
        model, tokenizer, benchmark.classnames, benchmark.templates, device, amp=False)


def vlp_classifier(model, tokenizer, root: Path, *, batch_size: int, device: str):
    benchmark = read_benchmark(root)
    return zero_shot_classifier(model, tokenizer, benchmark.classnames, benchmark.templates,
                                device=device, batch_size=batch_size)


def interleaved_medians(calls: dict[str, object], repeats: int) -> tuple[dict, dict]:
    """Median wall time of each call over `repeats` rounds after one warm-up round, and each
    call's warm-up result. The calls alternate within a round, so a change in machine load
    between rounds affects every call alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip_benchmark's tqdm bars and webdataset's warnings
        results = {name: fn() for name, fn in calls.items()}
        for _ in range(repeats):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlp-tiny")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    bundle = build_model(args.model)
    model = bundle.model.to(args.device).eval()
    image_size = bundle.preprocess_val.transforms[0].size
    with tempfile.TemporaryDirectory() as tmp:
        write_shapesworld(tmp, num_train=1, num_eval=args.num_images, progress=False,
                          image_size=max(64, int(image_size)))
        root = Path(tmp) / "zeroshot"
        common = {"batch_size": args.batch_size, "device": args.device}
        implementations = {
            "vlp": (vlp_evaluate, vlp_classifier, vlp_images),
            "clip_benchmark": (clip_benchmark_evaluate, clip_benchmark_classifier,
                               clip_benchmark_images),
        }
        classifier = vlp_classifier(model, bundle.tokenizer, root, **common)
        loading = {"num_workers": args.num_workers, **common}
        calls = {}
        for name, (evaluate, build_classifier, image_pass) in implementations.items():
            calls[(name, "total")] = lambda f=evaluate: f(
                model, bundle.tokenizer, bundle.preprocess_val, root, **loading)
            calls[(name, "prompts")] = lambda f=build_classifier: f(
                model, bundle.tokenizer, root, **common)
            calls[(name, "images")] = lambda f=image_pass: f(
                model, classifier, bundle.preprocess_val, root, **loading)
        seconds, results = interleaved_medians(calls, args.repeats)
        rows = {}
        for name in implementations:
            rows[name] = (args.num_images / seconds[(name, "total")], seconds[(name, "prompts")],
                          args.num_images / seconds[(name, "images")],
                          results[(name, "total")]["acc1"])

    print(f"zero-shot eval throughput: model {args.model}, {args.num_images} images "
          f"(ShapesWorld, 56 classes x 6 prompts), batch {args.batch_size}, "
          f"{args.num_workers} workers, {args.device}, torch {torch.__version__}, "
          f"median of {args.repeats}")
    header = ("implementation", "images/s", "class prompts s", "image pass images/s", "acc1")
    print(f"{header[0]:<16} {header[1]:>10} {header[2]:>16} {header[3]:>20} {header[4]:>7}")
    for name, (rate, prompts, image_rate, acc1) in rows.items():
        print(f"{name:<16} {rate:>10,.1f} {prompts:>16.2f} {image_rate:>20,.1f} {acc1:>7.4f}")
    (vlp_rate, vlp_prompts, vlp_image, vlp_acc), (cb_rate, cb_prompts, cb_image, cb_acc) = (
        rows.values())
    print(f"{'ratio vlp/cb':<16} {vlp_rate / cb_rate:>10.2f} {vlp_prompts / cb_prompts:>16.2f} "
          f"{vlp_image / cb_image:>20.2f}")
    if abs(vlp_acc - cb_acc) > 1e-9:
        print("WARNING: acc1 differs between the two implementations")


if __name__ == "__main__":
    main()
