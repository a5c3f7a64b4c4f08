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
`predict_zeroshot` runs them; clip_benchmark's `run_classification`). Each measurement runs
as back-to-back pairs (vlp then clip_benchmark in even rounds, clip_benchmark then vlp in odd
ones), so that changes in machine load hit both sides alike; a ratio is taken within each pair
and the table gives the median and range of those, by wall clock and by CPU time (of this
process; with --num-workers > 0 the loader workers' CPU is not counted). Checks that both give
the same acc1.

A second table compares the compositional sets: vlp's `evaluate_sugarcrepe` (each distinct image
and caption encoded once, in batches) against the loop of SugarCrepe's official `main_eval.py`
(RAIVNLab/sugar-crepe), reproduced in `official_sugarcrepe`: per item, open the image with PIL,
encode the positive and the negative caption and the image one at a time, score `pos > neg`.
Both read ShapesWorld's SugarCrepe-format set (`--sugarcrepe-items` items of each of the seven
subsets); checks that both give the same accuracies.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from vlp.data.shapesworld_writer import write_shapesworld
from vlp.eval.benchmark_data import iter_batches, read_benchmark
from vlp.eval.sugarcrepe import SUBSETS, evaluate_sugarcrepe
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


@torch.no_grad()
def official_sugarcrepe(model, tokenizer, preprocess, root: Path, *, device: str
                        ) -> dict[str, float]:
    """SugarCrepe's `main_eval.py`: `evaluate` and its `text_retrieval`, item by item."""
    from PIL import Image

    metrics = {}
    for subset in SUBSETS:
        data = json.loads((root / f"{subset}.json").read_text())
        correct = 0
        for entry in data.values():
            image = Image.open(root / "images" / entry["filename"])
            pos = model.encode_text(tokenizer(entry["caption"]).to(device), normalize=True)
            neg = model.encode_text(tokenizer(entry["negative_caption"]).to(device),
                                    normalize=True)
            img = model.encode_image(preprocess(image).unsqueeze(0).to(device), normalize=True)
            correct += 1 if (pos @ img.t()).item() > (neg @ img.t()).item() else 0
        metrics[subset] = correct / len(data)
    return metrics


def vlp_sugarcrepe(model, tokenizer, preprocess, root: Path, *, batch_size: int, device: str
                   ) -> dict[str, float]:
    result = evaluate_sugarcrepe(model, tokenizer, preprocess, root, device=device,
                                 batch_size=batch_size, progress=False)
    return {s: result.metrics[s] for s in SUBSETS}


def limit_sugarcrepe(source: Path, out: Path, items: int) -> int:
    """Copy the first `items` items of each subset (and the images folder, as a link) to `out`;
    return the number of items written."""
    out.mkdir()
    (out / "images").symlink_to(source / "images")
    total = 0
    for subset in SUBSETS:
        data = json.loads((source / f"{subset}.json").read_text())
        kept = dict(list(data.items())[:items])
        (out / f"{subset}.json").write_text(json.dumps(kept))
        total += len(kept)
    return total


Timing = tuple[float, float]
"""(wall, CPU) seconds of one call."""


def _timed(fn) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_pairs(calls: dict[str, dict[str, object]], repeats: int) -> tuple[dict, dict]:
    """Per measurement and implementation, `repeats` (wall, CPU) timings taken in back-to-back
    pairs whose order alternates round by round, after one warm-up round; and each call's
    warm-up result. `calls[measurement][implementation]` is a zero-argument callable."""
    times: dict[tuple[str, str], list[Timing]] = {
        (name, what): [] for what, pair in calls.items() for name in pair
    }
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip_benchmark's tqdm bars and webdataset's warnings
        results = {(name, what): fn() for what, pair in calls.items() for name, fn in pair.items()}
        for round_ in range(repeats):
            for what, pair in calls.items():
                names = list(pair) if round_ % 2 == 0 else list(pair)[::-1]
                for name in names:
                    times[(name, what)].append(_timed(pair[name]))
    return times, results


def med(timings: list[Timing], index: int) -> float:
    return statistics.median(t[index] for t in timings)


def pair_ratio(ours: list[Timing], theirs: list[Timing], index: int) -> str:
    """Median (range) over the pairs of theirs ÷ ours seconds: > 1 where ours is faster."""
    ratios = [b[index] / a[index] for a, b in zip(ours, theirs, strict=True)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vlp-tiny")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sugarcrepe-items", type=int, default=200,
                        help="items of each SugarCrepe subset in the compositional comparison "
                             "(0: skip it)")
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
        calls: dict[str, dict[str, object]] = {"total": {}, "prompts": {}, "images": {}}
        for name, (evaluate, build_classifier, image_pass) in implementations.items():
            calls["total"][name] = lambda f=evaluate: f(
                model, bundle.tokenizer, bundle.preprocess_val, root, **loading)
            calls["prompts"][name] = lambda f=build_classifier: f(
                model, bundle.tokenizer, root, **common)
            calls["images"][name] = lambda f=image_pass: f(
                model, classifier, bundle.preprocess_val, root, **loading)
        times, results = interleaved_pairs(calls, args.repeats)
        if args.sugarcrepe_items:
            sc_root = Path(tmp) / "sugarcrepe_bench"
            sc_items = limit_sugarcrepe(Path(tmp) / "sugarcrepe", sc_root, args.sugarcrepe_items)
            sc_calls = {"sugarcrepe": {
                "vlp": lambda: vlp_sugarcrepe(model, bundle.tokenizer, bundle.preprocess_val,
                                              sc_root, **common),
                "official": lambda: official_sugarcrepe(model, bundle.tokenizer,
                                                        bundle.preprocess_val, sc_root,
                                                        device=args.device),
            }}
            sc_times, sc_results = interleaved_pairs(sc_calls, args.repeats)

    print(f"zero-shot eval throughput: model {args.model}, {args.num_images} images "
          f"(ShapesWorld, 56 classes x 6 prompts), batch {args.batch_size}, "
          f"{args.num_workers} workers, {args.device}, torch {torch.__version__}, "
          f"{args.repeats} back-to-back pairs, order alternated")
    print("| measurement | vlp wall s | clip_benchmark wall s | speed-up, wall (pairs) "
          "| vlp CPU s | clip_benchmark CPU s | speed-up, CPU (pairs) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    labels = {"total": f"whole call, {args.num_images} images", "prompts": "class prompts",
              "images": f"image pass, {args.num_images} images"}
    for what, label in labels.items():
        ours, theirs = times[("vlp", what)], times[("clip_benchmark", what)]

        print(f"| {label} | {med(ours, 0):.2f} | {med(theirs, 0):.2f} "
              f"| {pair_ratio(ours, theirs, 0)} | {med(ours, 1):.2f} | {med(theirs, 1):.2f} "
              f"| {pair_ratio(ours, theirs, 1)} |")
    print("speed-up = clip_benchmark seconds ÷ vlp seconds within each pair (> 1: vlp faster); "
          "median (range) over the pairs")
    vlp_acc, cb_acc = (results[(name, "total")]["acc1"] for name in implementations)
    print(f"acc1: vlp {vlp_acc:.4f}, clip_benchmark {cb_acc:.4f}")
    if abs(vlp_acc - cb_acc) > 1e-9:
        print("WARNING: acc1 differs between the two implementations")
    if args.sugarcrepe_items:
        ours, theirs = sc_times[("vlp", "sugarcrepe")], sc_times[("official", "sugarcrepe")]
        print(f"\ncompositional sets: SugarCrepe-format ShapesWorld, {sc_items} items "
              f"({args.sugarcrepe_items} per subset), vlp `evaluate_sugarcrepe` (batch "
              f"{args.batch_size}) vs the official `main_eval.py` loop (one item at a time)")
        print("| measurement | vlp wall s | official wall s | speed-up, wall (pairs) "
              "| vlp CPU s | official CPU s | speed-up, CPU (pairs) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(f"| SugarCrepe, {sc_items} items | {med(ours, 0):.2f} | {med(theirs, 0):.2f} "
              f"| {pair_ratio(ours, theirs, 0)} | {med(ours, 1):.2f} | {med(theirs, 1):.2f} "
              f"| {pair_ratio(ours, theirs, 1)} |")
        mine, official = sc_results[("vlp", "sugarcrepe")], sc_results[("official", "sugarcrepe")]
        worst = max(abs(mine[s] - official[s]) for s in SUBSETS)
        print("accuracy per subset, vlp / official: " + ", ".join(
            f"{s} {mine[s]:.3f}/{official[s]:.3f}" for s in SUBSETS))
        if worst > 1e-6:  # accuracies are counts / items, float32 on the vlp side
            print("WARNING: SugarCrepe accuracies differ between the two implementations")


if __name__ == "__main__":
    main()
