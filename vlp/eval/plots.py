"""PNG figures for eval reports, drawn with matplotlib's object API (no pyplot, so the caller's
backend and global figure state are left alone)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_MAX_POINTS = 2000
_MAX_NEGATIVES = 200_000


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_gap_pca(image: torch.Tensor, text: torch.Tensor, path: str | Path) -> Path:
    """Both modalities projected on the first two principal components of their union, with
    each modality's centroid; at most 2000 points per modality are drawn."""
    x, y = image.double()[:_MAX_POINTS], text.double()[:_MAX_POINTS]
    both = torch.cat([x, y])
    mean = both.mean(0)
    _, _, v = torch.linalg.svd(both - mean, full_matrices=False)
    axes = v[:2].T
    px, py = (x - mean) @ axes, (y - mean) @ axes
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.scatter(px[:, 0], px[:, 1], s=6, alpha=0.5, label="image", color="tab:blue")
    ax.scatter(py[:, 0], py[:, 1], s=6, alpha=0.5, label="text", color="tab:orange")
    for points, color in ((px, "navy"), (py, "darkred")):
        centre = points.mean(0)
        ax.scatter([centre[0]], [centre[1]], marker="X", s=120, color=color, edgecolor="white")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("image and text embeddings (PCA; X = centroid)")
    ax.legend(loc="best")
    return _save(fig, Path(path))


def plot_similarity_histogram(image: torch.Tensor, text: torch.Tensor, path: str | Path) -> Path:
    """Histograms of matched cos(x_i, y_i) and unmatched cos(x_i, y_j), i≠j, over at most the
    first 2000 pairs (unmatched ones subsampled to at most 200,000)."""
    sims = image.double()[:_MAX_POINTS] @ text.double()[:_MAX_POINTS].T
    n = len(sims)
    positive = sims.diagonal()
    off = ~torch.eye(n, dtype=torch.bool)
    negative = sims[off]
    if len(negative) > _MAX_NEGATIVES:
        keep = torch.randperm(len(negative), generator=torch.Generator().manual_seed(0))
        negative = negative[keep[:_MAX_NEGATIVES]]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bins = 60
    ax.hist(negative.numpy(), bins=bins, density=True, alpha=0.6, label="unmatched (i≠j)")
    ax.hist(positive.numpy(), bins=bins, density=True, alpha=0.6, label="matched (i=i)")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title("image-text similarity")
    ax.legend(loc="best")
    return _save(fig, Path(path))


def plot_bars(
    values: Mapping[str, float],
    path: str | Path,
    *,
    title: str,
    references: Mapping[str, Mapping[str, float]] | None = None,
    chance: float | None = None,
) -> Path:
    """A bar per metric (fractions in [0, 1]), reference models as markers beside each bar,
    and an optional dashed chance line."""
    names = list(values)
    fig = Figure(figsize=(max(5.0, 0.6 * len(names) + 2), 4))
    ax = fig.add_subplot()
    ax.bar(range(len(names)), [values[n] for n in names], color="tab:blue", label="this model")
    markers = "os^Dv"
    for k, (label, ref) in enumerate((references or {}).items()):
        points = [(i, ref[n]) for i, n in enumerate(names) if n in ref and not math.isnan(ref[n])]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, marker=markers[k % len(markers)], color="black", zorder=3,
                       label=label, facecolor="white" if k % 2 else "black")
    if chance is not None:
        ax.axhline(chance, linestyle="--", color="gray", linewidth=1, label="chance")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, Path(path))
