"""ARO's COCO-Order and Flickr30k-Order: is the caption preferred to its word-shuffled versions?

The captions come from a CLIP_benchmark retrieval root (COCO or Flickr30k test captions, or
ShapesWorld's `retrieval/`); each (image, caption) is a case with four negatives built by
`vlp.eval.perturbations` from a seed that depends only on `seed` and the case's position, so
the set is the same whatever the batch size. Two protocols are scored on every case:

- `precision@1` follows ARO's protocol exactly, and is the number to put beside published ones:
  one draw per perturbation, kept even when it leaves the caption unchanged, and ARO's
  `argmax == 0` over the five options, which credits a tie to the true caption (an unchanged
  shuffle always ties, so a model blind to word order still scores on those cases).
- `strict_precision@1` and `strict_pairwise_<perturbation>` follow vlp's strict protocol:
  negatives redrawn until they differ from the caption, ties counted as wrong (a bag-of-words
  model scores 0), and pairwise the fraction of cases whose caption beats that perturbation
  alone (chance 0.5; precision@1's chance is 0.2). Not comparable with published numbers.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from vlp.eval.benchmark_data import RETRIEVAL, read_benchmark
from vlp.eval.embedding import embed_texts, root_embeddings
from vlp.eval.perturbations import PERTURBATIONS, OrderCase, make_aro_case, make_order_case
from vlp.eval.results import BenchmarkResult
from vlp.eval.tagging import build_tagger
from vlp.eval.zeroshot import Device, DualEncoder, Preprocess, Tokenizer


def strict_order_metrics(true_scores: torch.Tensor, negative_scores: torch.Tensor
                         ) -> dict[str, float]:
    """`strict_precision@1` (the caption strictly beats all negatives) and
    `strict_pairwise_<name>` from the caption's scores (N,) and the negatives' (N, 4), columns in
    `PERTURBATIONS` order."""
    beats = true_scores.view(-1, 1) > negative_scores
    metrics = {"strict_precision@1": beats.all(dim=1).float().mean().item()}
    for column, name in enumerate(PERTURBATIONS):
        metrics[f"strict_pairwise_{name}"] = beats[:, column].float().mean().item()
    return metrics


def aro_precision_at_1(true_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """ARO's `np.argmax(scores) == 0` over [caption, 4 negatives]: argmax takes the first of
    tied maxima, so the caption wins every tie."""
    return (true_scores >= negative_scores.max(dim=1).values).float().mean().item()


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
    images, captions = root_embeddings(model, preprocess, benchmark, device=device,
                                       batch_size=batch_size, num_workers=num_workers,
                                       progress=progress, desc="order images")
    aro, strict, skipped = _Cases(), _Cases(), 0
    for image, image_captions in enumerate(captions):
        for k, caption in enumerate(image_captions[:captions_per_image]):
            rng = random.Random(f"aro-order-aro-protocol/{seed}/{image}/{k}")
            aro.add(make_aro_case(caption, tag, rng, max_words=max_words), image)
            rng = random.Random(f"aro-order/{seed}/{image}/{k}")
            case = make_order_case(caption, tag, rng, max_words=max_words)
            if case is None:
                skipped += 1
            else:
                strict.add(case, image)
    if not strict.cases:
        raise ValueError(f"{root}: no caption with two different words to perturb")
    texts = embed_texts(model, tokenizer, aro.texts() + strict.texts(), device=device,
                        batch_size=batch_size, progress=progress, desc="order captions")
    metrics = {"precision@1": aro_precision_at_1(*aro.scores(images, texts)),
               **strict_order_metrics(*strict.scores(images, texts))}
    return BenchmarkResult(metrics, _details(aro.cases, strict.cases, skipped, seed, tagger_name),
                           _notes(aro.cases, strict.cases, skipped, tagger_name))


class _Cases:
    """Cases of one protocol and the image each belongs to."""

    def __init__(self) -> None:
        self.cases: list[OrderCase] = []
        self.images: list[int] = []

    def add(self, case: OrderCase, image: int) -> None:
        self.cases.append(case)
        self.images.append(image)

    def texts(self) -> list[str]:
        return [t for c in self.cases for t in (c.caption, *c.negatives)]

    def scores(self, images: torch.Tensor, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption's scores (N,) and the negatives' (N, 4)."""
        features = images[torch.tensor(self.images)]
        true = (features * texts([c.caption for c in self.cases])).sum(-1)
        negatives = torch.stack([(features * texts([c.negatives[i] for c in self.cases])).sum(-1)
                                 for i in range(len(PERTURBATIONS))], dim=1)
        return true, negatives


def _details(aro: list[OrderCase], strict: list[OrderCase], skipped: int, seed: int,
             tagger_name: str) -> dict:
    fallbacks = {name: sum(name in c.fallbacks for c in strict) for name in PERTURBATIONS}
    unchanged = {name: sum(c.negatives[i] == c.caption for c in aro)
                 for i, name in enumerate(PERTURBATIONS)}
    return {"num_cases": len(aro), "seed": seed, "tagger": tagger_name,
            "protocols": {
                "precision@1": "ARO (ties credited to the caption, unchanged shuffles kept)",
                "strict_*": "vlp strict (ties wrong, every negative differs from the caption)"},
            "aro_unchanged_negatives": unchanged,
            "aro_cases_with_an_unchanged_negative": sum(c.caption in c.negatives for c in aro),
            "strict_num_cases": len(strict), "strict_skipped_captions": skipped,
            "strict_fallbacks_to_shuffle_all_words": fallbacks,
            "example": {"caption": aro[0].caption,
                        "aro_negatives": dict(zip(PERTURBATIONS, aro[0].negatives, strict=True)),
                        "strict_negatives": dict(zip(PERTURBATIONS, strict[0].negatives,
                                                     strict=True))}}


def _notes(aro: list[OrderCase], strict: list[OrderCase], skipped: int, tagger_name: str
           ) -> list[str]:
    unchanged = sum(c.caption in c.negatives for c in aro)
    notes = [f"precision@1 follows ARO's protocol and is the one comparable with published "
             f"numbers: ties go to the true caption and unchanged shuffles are kept ({unchanged} "
             f"of {len(aro)} cases have a negative equal to the caption)",
             "strict_precision@1 and strict_pairwise_* follow vlp's strict protocol (ties wrong, "
             "every negative differs from the caption): not comparable with published numbers",
             f"word classes tagged by: {tagger_name}"]
    num_fallback = sum(bool(c.fallbacks) for c in strict)
    if num_fallback:
        notes.append(f"strict: {num_fallback} of {len(strict)} cases used shuffle_all_words for "
                     "a perturbation that could not change the caption")
    if skipped:
        notes.append(f"strict: {skipped} captions skipped: no two different words to reorder")
    return notes
