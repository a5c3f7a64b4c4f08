"""Plots a reader can trust (vlp.eval.plots): each bar chart states its chance level and marks
it on the bars it applies to, labels every bar with its value, and keeps its legend off the
bars; read back from the figure's artists."""

from __future__ import annotations

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle

from vlp.eval.plots import bar_figure, plot_similarity_histogram
from vlp.eval.tasks import TASKS

ORDER = {"precision@1": 0.40, "strict_precision@1": 0.30,
         "strict_pairwise_shuffle_nouns_and_adj": 0.70,
         "strict_pairwise_shuffle_allbut_nouns_and_adj": 0.80,
         "strict_pairwise_shuffle_within_trigrams": 0.65,
         "strict_pairwise_shuffle_trigrams": 1.0}


def bars_of(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def chance_segments(ax) -> list[tuple[float, float, float]]:
    """(x_start, x_end, y) of every dashed chance segment."""
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    return [(seg[0][0], seg[1][0], seg[0][1]) for seg in lines.get_segments()]


def test_order_plot_marks_chance_0_2_for_precision_and_0_5_for_pairwise_bars():
    fig = bar_figure(ORDER, title="order", chance=TASKS["order"].chance)
    ax = fig.axes[0]

    segments = chance_segments(ax)
    bars = bars_of(ax)
    assert len(segments) == len(bars) == 6
    for bar, (x0, x1, y), name in zip(bars, segments, ORDER, strict=True):
        assert x0 < bar.get_x() + bar.get_width() / 2 < x1  # the segment crosses its own bar
        assert y == (0.2 if name.endswith("precision@1") else 0.5)
    assert "chance 0.2 for precision@1, strict_precision@1; 0.5 for the rest" in ax.get_title()


def test_every_bar_is_labelled_with_its_value():
    fig = bar_figure(ORDER, title="order", chance=0.5)
    ax = fig.axes[0]

    labels = [t.get_text() for t in ax.texts]
    assert labels == [f"{v:.2f}" for v in ORDER.values()]
    assert [b.get_height() for b in bars_of(ax)] == pytest.approx(list(ORDER.values()))
    assert ax.get_ylim()[1] > 1.0  # the label of a bar at 1.0 stays inside the axes


@pytest.mark.parametrize("task", ["sugarcrepe", "aro", "order"])
def test_legend_covers_no_bar_even_with_reference_markers(task):
    names = TASKS[task].bar_metrics
    values = {n: 0.95 for n in names}  # tall bars: a legend inside the axes would cover them
    references = {"CLIP": {n: 0.6 for n in names}, "NegCLIP": {n: 0.8 for n in names}}
    fig = bar_figure(values, title=task, references=references, chance=TASKS[task].chance)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]

    legend = ax.get_legend().get_window_extent()
    entries = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"this model", "CLIP", "NegCLIP"} < entries
    assert any(entry.startswith("chance") for entry in entries)
    for bar in bars_of(ax):
        assert not legend.overlaps(bar.get_window_extent())


def test_plot_without_chance_draws_no_chance_marks():
    fig = bar_figure({"a": 0.5}, title="t")

    assert not [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    assert "chance" not in fig.axes[0].get_title()


def test_similarity_histogram_legend_names_what_is_matched(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr("vlp.eval.plots._save", lambda fig, path: figures.append(fig) or path)
    x = torch.nn.functional.normalize(torch.randn(20, 4), dim=1)

    plot_similarity_histogram(x, x, tmp_path / "h.png")

    texts = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert texts == ["unmatched: image i, caption j ≠ i", "matched: image i, its caption i"]
