"""Intra-modal and mixed-modality retrieval on a retrieval set, as modality-gap studies use them.

On the embeddings of `vlp.eval.retrieval` (each caption knows its image), with cosine scores and
ties ordered by `torch.topk`; a query never retrieves itself:

- `text_to_text_recall@k`: a caption finds another caption of its own image among its k nearest
  captions (captions of images with a single caption are left out);
- `image_to_image_recall@k`: an image finds an image that shares one of its captions (same text
  after lower-casing and stripping) among its k nearest images (images without such a twin are
  left out, and the metric with them when no image has one: ShapesWorld's captions are all
  distinct, and on COCO or Flickr30k few images share a caption);
- `mixed_text_query_recall@k`: a caption, searched against the pool of every image and every
  other caption, finds its image or another caption of its image among its k nearest;
- `mixed_image_query_recall@k`: an image, searched against every other image and every caption,
  finds one of its captions among its k nearest;
- `mixed_image_query_top1_is_image` / `mixed_text_query_top1_is_text`: how often the nearest
  item of the mixed pool has the query's own modality (near 1.0 when a modality gap separates
  the two clouds, whatever the pairs).

A metric with no query that has a relevant item is left out rather than reported as 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlp.eval.retrieval import RetrievalEmbeddings

_CHUNK = 1024


def modality_retrieval_metrics(
    embeddings: RetrievalEmbeddings, captions: Sequence[str], *, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """The metrics of the module docstring; `captions[t]` is the text of embedding row t."""
    images, texts = embeddings.image_features, embeddings.text_features
    owner = embeddings.text_to_image
    num_images = len(images)
    if len(captions) != len(texts):
        raise ValueError(f"{len(captions)} captions for {len(texts)} caption embeddings")
    # relevance as sets of item ids; in the mixed pool images are 0..I-1, captions I..I+T-1
    captions_of = [[] for _ in range(num_images)]
    for t, i in enumerate(owner.tolist()):
        captions_of[i].append(t)
    text_relevant = [{u for u in captions_of[i] if u != t} for t, i in enumerate(owner.tolist())]
    by_text: dict[str, set[int]] = {}
    for t, i in enumerate(owner.tolist()):
        by_text.setdefault(" ".join(captions[t].lower().split()), set()).add(i)
    image_relevant = [set() for _ in range(num_images)]
    for same in by_text.values():
        for i in same:
            image_relevant[i] |= same - {i}
    pool = torch.cat([images, texts])
    mixed_text = [{i} | {num_images + u for u in rel}
                  for i, rel in zip(owner.tolist(), text_relevant, strict=True)]
    mixed_image = [{num_images + u for u in captions_of[i]} for i in range(num_images)]

    metrics: dict[str, float] = {}
    top_k = max(ks)
    top = _top_excluding_self(texts, texts, top_k, offset=0)
    metrics |= _recalls("text_to_text_recall", top, text_relevant, ks)
    top = _top_excluding_self(images, images, top_k, offset=0)
    metrics |= _recalls("image_to_image_recall", top, image_relevant, ks)
    top_text = _top_excluding_self(texts, pool, top_k, offset=num_images)
    metrics |= _recalls("mixed_text_query_recall", top_text, mixed_text, ks)
    top_image = _top_excluding_self(images, pool, top_k, offset=0)
    metrics |= _recalls("mixed_image_query_recall", top_image, mixed_image, ks)
    metrics["mixed_image_query_top1_is_image"] = (top_image[:, 0] < num_images).float().mean().item()
    metrics["mixed_text_query_top1_is_text"] = (top_text[:, 0] >= num_images).float().mean().item()
    return metrics


def _top_excluding_self(queries: torch.Tensor, keys: torch.Tensor, k: int, *, offset: int
                        ) -> torch.Tensor:
    """(Q, min(k, K-1)) indices into `keys` of each query's best-scoring keys, query q itself
    (key `offset + q`) excluded; computed in chunks so no Q×K matrix is held at once."""
    k = min(k, len(keys) - 1)
    rows = []
    for start in range(0, len(queries), _CHUNK):
        scores = queries[start: start + _CHUNK] @ keys.T
        own = torch.arange(start, start + len(scores)) + offset
        scores[torch.arange(len(scores)), own] = -torch.inf
        rows.append(scores.topk(k, dim=1, largest=True, sorted=True).indices)
    return torch.cat(rows)


def _recalls(name: str, top: torch.Tensor, relevant: list[set[int]], ks: Sequence[int]
             ) -> dict[str, float]:
    queries = [q for q, rel in enumerate(relevant) if rel]
    if not queries:
        return {}
    out = {}
    for k in ks:
        hits = sum(bool(relevant[q] & set(top[q, :k].tolist())) for q in queries)
        out[f"{name}@{k}"] = hits / len(queries)
    return out
