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
    fig.savefig(path, dpi=110, bbox_inches="tight")  # legends outside the axes are kept
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
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
    ax.hist(negative.numpy(), bins=bins, density=True, alpha=0.6,
            label="unmatched: image i, caption j ≠ i")
    ax.hist(positive.numpy(), bins=bins, density=True, alpha=0.6,
            label="matched: image i, its caption i")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title("image-text similarity (no chance level: a distribution, not a score)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small")
    return _save(fig, Path(path))


Chance = float | Mapping[str, float] | None
"""One chance level for every bar, or one per metric (bars without one get no chance mark)."""


def plot_bars(
    values: Mapping[str, float],
    path: str | Path,
    *,
    title: str,
    references: Mapping[str, Mapping[str, float]] | None = None,
    chance: Chance = None,
) -> Path:
    """Save `bar_figure(...)` as a PNG at `path`."""
    return _save(bar_figure(values, title=title, references=references, chance=chance),
                 Path(path))


def bar_figure(
    values: Mapping[str, float],
    *,
    title: str,
    references: Mapping[str, Mapping[str, float]] | None = None,
    chance: Chance = None,
) -> Figure:
    """A bar per metric (fractions in [0, 1]) labelled with its value, reference models as
    markers beside each bar, and each bar's chance level as a dashed segment across it; the title
    states the chance level(s) and the legend sits outside the axes, clear of the bars."""
    names = list(values)
    levels = _chance_levels(names, chance)
    fig = Figure(figsize=(max(6.0, 0.8 * len(names) + 4.0), 4.4))
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), [values[n] for n in names], color="tab:blue",
                  label="this model")
    ax.bar_label(bars, labels=[f"{values[n]:.2f}" for n in names], padding=2, fontsize="small")
    markers = "os^Dv"
    for k, (label, ref) in enumerate((references or {}).items()):
        points = [(i, ref[n]) for i, n in enumerate(names) if n in ref and not math.isnan(ref[n])]
        if points:
            xs, ys = zip(*points, strict=True)
            offset = 0.28 + 0.12 * (k % 3)  # beside the bar's centre, clear of its value label
            ax.scatter([x + offset for x in xs], ys, marker=markers[k % len(markers)],
                       color="black", zorder=5, label=label,
                       facecolor="white" if k % 2 else "black")
    drawn = [(i, levels[n]) for i, n in enumerate(names) if levels.get(n) is not None]
    if drawn:
        xs, ys = zip(*drawn, strict=True)
        ax.hlines(ys, [x - 0.45 for x in xs], [x + 0.45 for x in xs], colors="gray",
                  linestyles="--", linewidth=1.2, zorder=4,
                  label="chance" if len(set(ys)) == 1 else "chance (per bar, see title)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylim(0, 1.08)  # room for the value labels of bars at 1.0
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\n{_chance_label(levels)}" if drawn else title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
    return fig


def _chance_levels(names: list[str], chance: Chance) -> dict[str, float | None]:
    if chance is None or isinstance(chance, (int, float)):
        return {n: chance for n in names}
    return {n: chance.get(n) for n in names}


def _chance_label(levels: Mapping[str, float | None]) -> str:
    """`chance 0.5`, or with several levels `chance 0.2 for a, b; 0.5 for the rest`."""
    groups: dict[float, list[str]] = {}
    for name, level in levels.items():
        if level is not None:
            groups.setdefault(level, []).append(name)
    if len(groups) == 1:
        return f"chance {next(iter(groups)):g}"
    ordered = sorted(groups.items(), key=lambda item: len(item[1]))
    parts = [f"{level:g} for {', '.join(names)}" for level, names in ordered[:-1]]
    return "chance " + "; ".join([*parts, f"{ordered[-1][0]:g} for the rest"])


def plot_lines(
    series: Mapping[str, list[tuple[float, float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
) -> Path:
    """One line with markers per named series of (x, y) points, e.g. headline metrics against
    the training step; the legend sits outside the axes."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for label, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0)
    return _save(fig, Path(path))
