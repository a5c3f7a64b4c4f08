"""ARO's COCO-Order and Flickr30k-Order: is the caption preferred to its word-shuffled versions?

The captions come from a CLIP_benchmark retrieval root (COCO or Flickr30k test captions, or
ShapesWorld's `retrieval/`); each (image, caption) is a case with four negatives built by
`vlp.eval.perturbations` from a seed that depends only on `seed` and the case's position, so
the set is the same whatever the batch size. The score is ARO's precision@1 among the five
options, with ties counted as wrong (ARO's argmax would credit a tie to the true caption, so a
model blind to word order could score 100%). `pairwise_<perturbation>` is the fraction of cases
whose caption beats that perturbation alone.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from vlp.eval.benchmark_data import RETRIEVAL, iter_batches, read_benchmark
from vlp.eval.embedding import embed_texts
from vlp.eval.perturbations import PERTURBATIONS, OrderCase, make_order_case
from vlp.eval.results import BenchmarkResult
from vlp.eval.tagging import build_tagger
from vlp.eval.zeroshot import Device, DualEncoder, Preprocess, Tokenizer, encode_images, eval_mode


def order_metrics(true_scores: torch.Tensor, negative_scores: torch.Tensor) -> dict[str, float]:
    """`precision@1` (the caption strictly beats all negatives) and `pairwise_<name>` from the
    caption's scores (N,) and the negatives' (N, 4), columns in `PERTURBATIONS` order."""
    beats = true_scores.view(-1, 1) > negative_scores
    metrics = {"precision@1": beats.all(dim=1).float().mean().item()}
    for column, name in enumerate(PERTURBATIONS):
        metrics[f"pairwise_{name}"] = beats[:, column].float().mean().item()
    return metrics


def evaluate_order(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    seed: int = 0,
    tagger: str = "auto",
    max_words: int = 30,
    captions_per_image: int | None = None,
    split: str = "test",
    device: Device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> BenchmarkResult:
    """COCO/Flickr30k-Order on a retrieval root: every caption of every image (or the first
    `captions_per_image`) against its four perturbations."""
    benchmark = read_benchmark(root, split=split)
    if benchmark.dataset_type != RETRIEVAL:
        raise ValueError(f"{root}: the order benchmark needs a retrieval root (captions), "
                         f"got a {benchmark.dataset_type} one")
    if captions_per_image is not None and captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1 or None, got {captions_per_image}")
    tag, tagger_name = build_tagger(tagger)
    image_features, cases, case_images = [], [], []
    skipped, num_images = 0, 0
    batches = iter_batches(benchmark, preprocess, batch_size=batch_size, num_workers=num_workers)
    with eval_mode(model):
        for images, captions in tqdm(batches, desc="order images", unit="batch",
                                     disable=not progress):
            image_features.append(encode_images(model, images, device=device).cpu())
            for image_captions in captions:
                for k, caption in enumerate(image_captions[:captions_per_image]):
                    rng = random.Random(f"aro-order/{seed}/{num_images}/{k}")
                    case = make_order_case(caption, tag, rng, max_words=max_words)
                    if case is None:
                        skipped += 1
                        continue
                    cases.append(case)
                    case_images.append(num_images)
                num_images += 1
    if not cases:
        raise ValueError(f"{root}: no caption with two different words to perturb")
    texts = embed_texts(model, tokenizer, [t for c in cases for t in (c.caption, *c.negatives)],
                        device=device, batch_size=batch_size, progress=progress,
                        desc="order captions")
    images = torch.cat(image_features)[torch.tensor(case_images)]
    true_scores = (images * texts([c.caption for c in cases])).sum(-1)
    negative_scores = torch.stack(
        [(images * texts([c.negatives[i] for c in cases])).sum(-1) for i in range(4)], dim=1
    )
    return BenchmarkResult(order_metrics(true_scores, negative_scores),
                           _details(cases, skipped, seed, tagger_name),
                           _notes(cases, skipped, tagger_name))


def _details(cases: list[OrderCase], skipped: int, seed: int, tagger_name: str) -> dict:
    fallbacks = {name: sum(name in c.fallbacks for c in cases) for name in PERTURBATIONS}
    return {"num_cases": len(cases), "skipped_captions": skipped, "seed": seed,
            "tagger": tagger_name, "fallbacks_to_shuffle_all_words": fallbacks,
            "example": {"caption": cases[0].caption,
                        "negatives": dict(zip(PERTURBATIONS, cases[0].negatives, strict=True))}}


def _notes(cases: list[OrderCase], skipped: int, tagger_name: str) -> list[str]:
    notes = [f"word classes tagged by: {tagger_name}"]
    num_fallback = sum(bool(c.fallbacks) for c in cases)
    if num_fallback:
        notes.append(f"{num_fallback} of {len(cases)} cases used shuffle_all_words for a "
                     "perturbation that could not change the caption")
    if skipped:
        notes.append(f"{skipped} captions skipped: no two different words to reorder")
    return notes
