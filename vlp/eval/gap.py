"""The modality gap and related geometry of matched image and text embeddings (docs/design.md §5).

On n matched pairs (x_i, y_i), both L2-normalised:

- `gap`: ‖mean x − mean y‖, the distance between the modalities' centroids (Liang et al.,
  "Mind the Gap", NeurIPS 2022);
- `matched_cosine`: mean x_i·y_i; `alignment`: E‖x_i − y_i‖² (= 2 − 2·matched_cosine);
- `uniformity_image`, `uniformity_text`: log E_{i≠j} exp(−2‖a_i − a_j‖²) within a modality, and
  `uniformity_cross`: the same over every image–text pair (i, j) (Wang & Isola, ICML 2020;
  lower is more uniform);
- `cone_image`, `cone_text`: mean cosine between distinct embeddings of one modality (how narrow
  the cone each modality occupies is);
- `separability`: test accuracy of a logistic regression telling images from texts, trained on
  80% of the pairs and tested on the other 20% (split by pair, fixed seed): 0.5 means the
  modalities overlap, 1.0 that a hyperplane splits them;
- `effective_rank_image`, `effective_rank_text`: exp of the entropy of the normalised singular
  values of the (uncentred) embedding matrix (Roy & Vetterli, 2007): 1 for embeddings on a line,
  D for isotropic ones;
- `mean_positive_similarity`, `mean_negative_similarity`: mean x_i·y_i and mean x_i·y_j (i≠j).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlp.eval.benchmark_data import RETRIEVAL, read_benchmark
from vlp.eval.embedding import embed_texts, root_embeddings
from vlp.eval.results import BenchmarkResult
from vlp.eval.zeroshot import Device, DualEncoder, Preprocess, Tokenizer

UNIFORMITY_T = 2.0
_CHUNK = 1024


def modality_gap_metrics(
    image: torch.Tensor, text: torch.Tensor, *, seed: int = 0, test_fraction: float = 0.2
) -> dict[str, float]:
    """Every metric of the module docstring for matched rows of `image` and `text` (N, D);
    rows are L2-normalised here (a no-op for model embeddings)."""
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"need two (N, D) tensors of one shape, got {tuple(image.shape)} and "
                         f"{tuple(text.shape)}")
    if len(image) < 2:
        raise ValueError(f"need at least 2 pairs, got {len(image)}")
    x = F.normalize(image.double(), dim=-1)
    y = F.normalize(text.double(), dim=-1)
    cheap = {name: value.item() for name, value in pair_statistics(x, y).items()}
    return {
        "gap": cheap["gap"],
        "matched_cosine": cheap["matched_cosine"],
        "alignment": cheap["alignment"],
        "uniformity_image": cheap["uniformity_image"],
        "uniformity_text": cheap["uniformity_text"],
        "uniformity_cross": cross_uniformity(x, y),
        "cone_image": mean_pairwise_cosine(x),
        "cone_text": mean_pairwise_cosine(y),
        "separability": linear_separability(x, y, seed=seed, test_fraction=test_fraction),
        "effective_rank_image": effective_rank(x),
        "effective_rank_text": effective_rank(y),
        "mean_positive_similarity": cheap["matched_cosine"],
        "mean_negative_similarity": cheap["mean_negative_similarity"],
    }


def pair_statistics(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics cheap enough to compute during training, on matched unit vectors x, y (N, D),
    N >= 2: `gap`, `matched_cosine`, `alignment`, `uniformity_image`, `uniformity_text` and
    `mean_negative_similarity`, as 0-dim tensors on x's device in x's dtype (no host sync)."""
    positive = (x * y).sum(-1)
    n = len(x)
    total = (x.sum(0) * y.sum(0)).sum()  # sum over all (i, j) of x_i·y_j
    return {
        "gap": (x.mean(0) - y.mean(0)).norm(),
        "matched_cosine": positive.mean(),
        "alignment": (x - y).pow(2).sum(-1).mean(),
        "uniformity_image": _uniformity(x),
        "uniformity_text": _uniformity(y),
        "mean_negative_similarity": (total - positive.sum()) / (n * (n - 1)),
    }


def uniformity(z: torch.Tensor, t: float = UNIFORMITY_T) -> float:
    """log E_{i≠j} exp(−t‖z_i − z_j‖²) over distinct rows of unit vectors z (N, D)."""
    return _uniformity(z, t).item()


def _uniformity(z: torch.Tensor, t: float = UNIFORMITY_T) -> torch.Tensor:
    n = len(z)
    return _pairwise_lse(z, z, t, skip_diagonal=True) - math.log(n * (n - 1))


def cross_uniformity(x: torch.Tensor, y: torch.Tensor, t: float = UNIFORMITY_T) -> float:
    """log E_{i,j} exp(−t‖x_i − y_j‖²) over every pair of rows of two unit-vector sets."""
    return (_pairwise_lse(x, y, t, skip_diagonal=False) - math.log(len(x) * len(y))).item()


def _pairwise_lse(a: torch.Tensor, b: torch.Tensor, t: float, *,
                  skip_diagonal: bool) -> torch.Tensor:
    """logsumexp of −t‖a_i − b_j‖² over all (i, j), in row chunks so memory stays O(chunk·N);
    a 0-dim tensor on a's device."""
    total = torch.full((), -math.inf, dtype=a.dtype, device=a.device)
    for start in range(0, len(a), _CHUNK):
        block = -t * (2.0 - 2.0 * a[start: start + _CHUNK] @ b.T).clamp_min(0.0)
        if skip_diagonal:
            rows = torch.arange(len(block), device=a.device)
            block[rows, rows + start] = -math.inf
        total = torch.logaddexp(total, torch.logsumexp(block.flatten(), dim=0))
    return total


def mean_pairwise_cosine(z: torch.Tensor) -> float:
    """Mean z_i·z_j over i≠j for unit vectors: (‖Σz‖² − N) / (N(N − 1))."""
    n = len(z)
    return ((z.sum(0).pow(2).sum() - z.pow(2).sum()) / (n * (n - 1))).item()


def effective_rank(z: torch.Tensor) -> float:
    """exp(H(p)) with p the singular values of z divided by their sum (Roy & Vetterli, 2007)."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def linear_separability(
    x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, test_fraction: float = 0.2
) -> float:
    """Held-out accuracy of sklearn's logistic regression telling rows of x (label 0) from rows
    of y (label 1); pairs go to train or test together, so a pair never straddles the split."""
    from sklearn.linear_model import LogisticRegression

    n = len(x)
    order = np.random.default_rng(seed).permutation(n)
    num_test = max(1, round(test_fraction * n))
    if num_test >= n:
        raise ValueError(f"test_fraction {test_fraction} leaves no training pairs out of {n}")
    test, train = order[:num_test], order[num_test:]
    xs, ys = x.numpy(), y.numpy()

    def split(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = np.concatenate([xs[rows], ys[rows]])
        labels = np.concatenate([np.zeros(len(rows)), np.ones(len(rows))])
        return features, labels

    classifier = LogisticRegression(max_iter=1000, random_state=seed)
    classifier.fit(*split(train))
    return float(classifier.score(*split(test)))


def matched_pairs(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    max_pairs: int | None = None,
    split: str = "test",
    device: Device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Embeddings of matched (image, text) pairs from a benchmark root, and where the texts
    came from: a retrieval root pairs each image with its first caption, a classification root
    with its class's first prompt template."""
    benchmark = read_benchmark(root, split=split)
    if benchmark.dataset_type == RETRIEVAL:
        source = "first caption of each image"
    else:
        template = (benchmark.templates or ["{c}"])[0]
        source = f"class prompt {template!r}"
    images, labels = root_embeddings(model, preprocess, benchmark, device=device,
                                     batch_size=batch_size, num_workers=num_workers,
                                     progress=progress, desc="gap images")
    if benchmark.dataset_type == RETRIEVAL:
        texts = [captions[0] if captions else "" for captions in labels[:max_pairs]]
    else:
        texts = [template.format(c=benchmark.classnames[c]) for c in labels[:max_pairs]]
    image_features = images[:max_pairs]
    if "" in texts:
        raise ValueError(f"{root}: image {texts.index('')} has no caption")
    text_features = embed_texts(model, tokenizer, texts, device=device, batch_size=batch_size,
                                progress=progress, desc="gap texts")(texts)
    return image_features, text_features, source


def evaluate_gap(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    max_pairs: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    split: str = "test",
    plot_dir: str | Path | None = None,
    device: Device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> BenchmarkResult:
    """Modality-gap metrics on a benchmark root's matched pairs; with `plot_dir`, also a PCA
    scatter of both modalities and a histogram of matched vs unmatched similarities."""
    image, text, source = matched_pairs(
        model, tokenizer, preprocess, root, max_pairs=max_pairs, split=split, device=device,
        batch_size=batch_size, num_workers=num_workers, progress=progress,
    )
    metrics = modality_gap_metrics(image, text, seed=seed, test_fraction=test_fraction)
    result = BenchmarkResult(metrics, {"num_pairs": len(image), "text_source": source},
                             [f"pairs: {len(image)} images with the {source}"])
    if plot_dir is not None:
        from vlp.eval.plots import plot_gap_pca, plot_similarity_histogram

        plot_dir = Path(plot_dir)
        result.plots["PCA of image and text embeddings"] = plot_gap_pca(
            image, text, plot_dir / "gap_pca.png")
        result.plots["matched vs unmatched image-text similarity"] = plot_similarity_histogram(
            image, text, plot_dir / "gap_similarity.png")
    return result
