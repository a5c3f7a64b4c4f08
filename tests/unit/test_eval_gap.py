"""Modality-gap metrics (vlp.eval.gap) on embeddings built so that every value is known by hand."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from vlp.eval.benchmark_data import write_benchmark
from vlp.eval.gap import (
    cross_uniformity,
    effective_rank,
    evaluate_gap,
    linear_separability,
    modality_gap_metrics,
    uniformity,
)

THETA = 0.6
C, S = math.cos(THETA), math.sin(THETA)


def clouds() -> tuple[torch.Tensor, torch.Tensor]:
    """Images: cos θ·e0 ± sin θ·e2 and cos θ·e0 ± sin θ·e3; texts: the same with e1 for e0.
    Both unit length; pair i shares its spread direction. Centroids: cos θ·e0 and cos θ·e1."""
    spread = torch.tensor([[0, 0, 1, 0], [0, 0, -1, 0], [0, 0, 0, 1], [0, 0, 0, -1.0]])
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    return C * e0 + S * spread, C * e1 + S * spread


def test_gap_of_two_offset_clouds_is_the_distance_between_their_centroids():
    image, text = clouds()

    metrics = modality_gap_metrics(image, text)

    assert metrics["gap"] == pytest.approx(C * math.sqrt(2))
    assert metrics["matched_cosine"] == pytest.approx(S**2)
    assert metrics["alignment"] == pytest.approx(2 - 2 * S**2)


def test_cone_is_the_mean_cosine_between_distinct_embeddings_of_a_modality():
    image, _ = clouds()

    # each point: one antipodal partner (cos² − sin²) and two orthogonal spreads (cos²)
    expected = (4 * (C**2 - S**2) + 8 * C**2) / 12

    metrics = modality_gap_metrics(image, image)
    assert metrics["cone_image"] == pytest.approx(expected)
    assert metrics["cone_text"] == pytest.approx(expected)


def test_mean_negative_similarity_averages_unmatched_pairs():
    image, text = clouds()

    # unmatched pairs: the antipodal spread (−sin²) once and two orthogonal ones (0) per row
    expected = (4 * -(S**2)) / 12

    assert modality_gap_metrics(image, text)["mean_negative_similarity"] == pytest.approx(expected)


def test_identical_modalities_have_no_gap_and_cannot_be_separated():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(200, 16), dim=-1)

    metrics = modality_gap_metrics(z, z.clone())

    assert metrics["gap"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["alignment"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["matched_cosine"] == pytest.approx(1.0)
    assert metrics["separability"] == 0.5  # each test pair: one right, one wrong
    assert metrics["uniformity_image"] == pytest.approx(metrics["uniformity_text"])


def test_far_apart_modalities_are_linearly_separable():
    torch.manual_seed(0)
    noise = 0.1 * torch.randn(100, 8)
    image = torch.nn.functional.normalize(noise + torch.eye(8)[0], dim=-1)
    text = torch.nn.functional.normalize(noise + torch.eye(8)[1], dim=-1)

    assert linear_separability(image, text) == 1.0


def test_uniformity_by_hand():
    v = torch.tensor([[1.0, 0.0]])

    assert uniformity(torch.cat([v, -v]).double()) == pytest.approx(-2 * 4)  # ‖v − (−v)‖² = 4
    assert uniformity(torch.cat([v, v]).double()) == pytest.approx(0.0)


def test_cross_uniformity_averages_every_image_text_pair():
    x = torch.eye(2).double()

    expected = math.log((1 + math.exp(-4) + math.exp(-4) + 1) / 4)  # ‖e0 − e1‖² = 2

    assert cross_uniformity(x, x) == pytest.approx(expected)


def test_uniformity_is_the_same_in_chunks(monkeypatch):
    torch.manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(50, 4), dim=-1).double()
    whole = uniformity(z)

    monkeypatch.setattr("vlp.eval.gap._CHUNK", 7)

    assert uniformity(z) == pytest.approx(whole, abs=1e-12)


def test_effective_rank_of_isotropic_set_is_the_dimension_and_of_a_line_is_one():
    torch.manual_seed(0)
    isotropic = torch.randn(5000, 8)
    line = torch.randn(100, 1) * torch.tensor([[1.0, 2.0, 3.0, 4.0]])

    assert effective_rank(isotropic) == pytest.approx(8.0, abs=0.05)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-5)  # float32 rounding


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        modality_gap_metrics(torch.ones(3, 2), torch.ones(4, 2))


class LookupModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vocab: list[str] = []

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([int(t.split()[-1]) for t in texts])

    def encode_image(self, ids: torch.Tensor) -> torch.Tensor:
        return clouds()[0][ids]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return clouds()[1][ids]


def red_value(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0))[0])


def test_evaluate_gap_pairs_each_image_with_its_first_caption_and_draws_plots(tmp_path):
    samples = [(Image.new("RGB", (4, 4), (i, 0, 0)), [f"caption {i}", "other 0"])
               for i in range(4)]
    root = write_benchmark(tmp_path / "retrieval", samples, dataset_type="retrieval")
    model = LookupModel()

    result = evaluate_gap(model, model.tokenizer, red_value, root, batch_size=3,
                          plot_dir=tmp_path / "plots", progress=False)

    assert result.metrics["gap"] == pytest.approx(C * math.sqrt(2))
    assert result.details["num_pairs"] == 4
    assert [p.name for p in result.plots.values()] == ["gap_pca.png", "gap_similarity.png"]
    assert all(p.stat().st_size > 1000 for p in result.plots.values())


def test_evaluate_gap_pairs_images_with_their_class_prompt(tmp_path):
    samples = [(Image.new("RGB", (4, 4), (i, 0, 0)), i) for i in range(4)]
    root = write_benchmark(tmp_path / "cls", samples, classnames=["0", "1", "2", "3"],
                           templates=["a photo of {c}", "art of {c}"])
    model = LookupModel()

    result = evaluate_gap(model, model.tokenizer, red_value, root, max_pairs=3, progress=False)

    assert result.details == {"num_pairs": 3, "text_source": "class prompt 'a photo of {c}'"}
