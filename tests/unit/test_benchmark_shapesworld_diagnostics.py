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
