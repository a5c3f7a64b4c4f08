"""Zero-shot image–text retrieval on CLIP_benchmark-layout benchmarks, scored as CLIP_benchmark.

Every image has one or more captions. With scores `text_features @ image_features.T`:
`image_retrieval_recall@k` (text → image) is the fraction of captions whose image is among their
k best-scoring images, and `text_retrieval_recall@k` (image → text) the fraction of images with
at least one of their captions among their k best-scoring captions — the "at least one hit"
recall of CLIP papers, as `clip_benchmark.metrics.zeroshot_retrieval` computes it, ties ordered
by `torch.topk`. An image without captions counts as a miss. Where k exceeds the number of
candidates, all candidates are retrieved (CLIP_benchmark raises instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.eval.benchmark_data import RETRIEVAL, read_benchmark
from vlp.eval.embedding import embed_texts, root_embeddings
from vlp.eval.zeroshot import Device, DualEncoder, Preprocess, Tokenizer


@dataclass(frozen=True)
class RetrievalEmbeddings:
    """Normalised embeddings of a retrieval set and which image each caption describes."""

    image_features: torch.Tensor
    """(I, D) float32."""
    text_features: torch.Tensor
    """(T, D) float32."""
    text_to_image: torch.Tensor
    """(T,) int64 index of each caption's image."""
    captions: tuple[str, ...] = ()
    """The text of each caption row (filled by `embed_retrieval_set`)."""


def evaluate_retrieval(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    ks: Sequence[int] = (1, 5, 10),
    device: Device = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    split: str = "test",
    num_workers: int = 0,
) -> dict[str, float]:
    """`image_retrieval_recall@k` and `text_retrieval_recall@k` for each k on a retrieval root."""
    embeddings = embed_retrieval_set(
        model,
        tokenizer,
        preprocess,
        root,
        device=device,
        batch_size=batch_size,
        progress=progress,
        split=split,
        num_workers=num_workers,
    )
    return retrieval_metrics(embeddings, ks=ks)


def embed_retrieval_set(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    device: Device = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    split: str = "test",
    num_workers: int = 0,
) -> RetrievalEmbeddings:
    """Embed every image of a retrieval benchmark root and all of its captions."""
    benchmark = read_benchmark(root, split=split)
    if benchmark.dataset_type != RETRIEVAL:
        raise ValueError(
            f"{root} is a {benchmark.dataset_type} benchmark (no {RETRIEVAL!r} in "
            "dataset_type.txt); use vlp.eval.evaluate_zeroshot"
        )
    image_features, captions = root_embeddings(
        model, preprocess, benchmark, device=device, batch_size=batch_size,
        num_workers=num_workers, progress=progress, desc="retrieval images",
    )  # fmt: skip
    flat = [caption for image_captions in captions for caption in image_captions]
    if not flat:
        raise ValueError(f"no captions in the retrieval benchmark {root}")
    text_to_image = [i for i, image_captions in enumerate(captions) for _ in image_captions]
    texts = embed_texts(model, tokenizer, flat, device=device, batch_size=batch_size,
                        progress=progress, desc="retrieval captions")
    return RetrievalEmbeddings(
        image_features, texts(flat), torch.tensor(text_to_image, dtype=torch.long), tuple(flat)
    )


def retrieval_metrics(
    embeddings: RetrievalEmbeddings, *, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions (definitions in the module docstring)."""
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    scores = embeddings.text_features @ embeddings.image_features.T  # (T, I), as CLIP_benchmark
    text_to_image = embeddings.text_to_image
    image_ids = torch.arange(scores.shape[1]).view(-1, 1)
    metrics = {}
    for k in ks:
        top_images = _top_indices(scores, k)  # (T, k)
        top_texts = _top_indices(scores.T, k)  # (I, k)
        image_hits = (top_images == text_to_image.view(-1, 1)).any(dim=1)
        text_hits = (text_to_image[top_texts] == image_ids).any(dim=1)
        metrics[f"image_retrieval_recall@{k}"] = image_hits.float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_hits.float().mean().item()
    return metrics


def _top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(min(k, scores.shape[1]), dim=1, largest=True, sorted=True).indices
