"""`benchmarks/shapesworld_diagnostics.py pairs`: how an image relates to the captions of its
training batch, and what share of the loss each kind of pair carries."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "shapesworld_diagnostics.py"


@pytest.fixture(scope="module")
def diag():
    spec = importlib.util.spec_from_file_location("shapesworld_diagnostics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_caption_is_of_the_same_names_one_shared_or_disjoint(diag):
    red_circle, blue_star = ("red", "circle"), ("blue", "star")
    assert diag._pair_kind((blue_star, red_circle), (blue_star, red_circle)) == "same names"
    assert diag._pair_kind((red_circle,), (blue_star, red_circle)) == "one name shared"
    assert diag._pair_kind((red_circle,), (blue_star,)) == "disjoint"


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", line)]


def test_every_pair_of_a_batch_is_counted_once_and_the_shares_sum_to_one(diag):
    out = diag.batch_pairs("random", samples=70, batch=32, model_name="vlp-tiny-rn")
    assert list(out)[1:] == list(diag.PAIR_KINDS)
    per_row = {kind: numbers(out[kind])[0] for kind in diag.PAIR_KINDS}
    shares = {kind: numbers(out[kind])[-1] for kind in diag.PAIR_KINDS}
    assert per_row["matched"] == 1.0
    assert sum(per_row.values()) == pytest.approx(32, abs=0.02)  # 64 samples: 2 whole batches
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.003)
    assert "softmax mass" in out["matched"]  # no logit bias: a softmax model


def test_geometry_of_two_opposite_cones_shows_opposite_means_and_residuals_that_still_match(diag):
    import torch

    torch.manual_seed(0)
    axis = torch.nn.functional.normalize(torch.randn(64), dim=0)
    content = torch.randn(500, 64)
    x = torch.nn.functional.normalize(axis + 0.1 * content, dim=1)
    y = torch.nn.functional.normalize(-axis + 0.1 * content, dim=1)
    out = diag.embedding_geometry(x, y)
    assert out["cos(μx, μy)"] < -0.99
    assert out["image mean norm ‖μx‖"] > 0.7 and out["text mean norm ‖μy‖"] > 0.7
    assert out["matched cosine"] < 0
    assert out["gap ‖μx − μy‖"] == pytest.approx(
        out["image mean norm ‖μx‖"] + out["text mean norm ‖μy‖"], rel=1e-3)
    assert out["matched cosine"] < out["matched cosine after removing each mean"]
    assert out["matched cosine after removing each mean"] > 0.9


def test_geometry_of_identical_modalities_has_no_gap_and_perfect_matches(diag):
    import torch

    x = torch.nn.functional.normalize(torch.randn(200, 16), dim=1)
    out = diag.embedding_geometry(x, x.clone())
    assert out["gap ‖μx − μy‖"] == pytest.approx(0.0, abs=1e-6)
    assert out["matched cosine"] == pytest.approx(1.0, abs=1e-5)
    assert out["unmatched cosine"] < 0.1


def test_geometry_command_measures_an_untrained_model_at_a_given_seed(diag):
    out = diag.geometry("random", samples=64, model_name="vlp-tiny-rn", seed=1)
    assert set(out) == {"image mean norm ‖μx‖", "text mean norm ‖μy‖", "cos(μx, μy)",
                        "gap ‖μx − μy‖", "matched cosine", "unmatched cosine",
                        "matched cosine after removing each mean"}
    assert 0.0 <= out["gap ‖μx − μy‖"] <= 2.0
