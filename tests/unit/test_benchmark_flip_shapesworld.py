"""The speed table of `benchmarks/flip_shapesworld.py`, on hand-written timings (no training):
speedups are taken within each repeat, never as a ratio of medians."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flip_shapesworld.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("flip_shapesworld", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def cells(table: str) -> dict[str, list[str]]:
    """Row cells by the row's first cell (the ratio)."""
    out = {}
    for line in table.splitlines()[2:]:
        row = [c.strip() for c in line.strip("|").split("|")]
        out[row[0]] = row[1:]
    return out


def test_speedups_are_per_repeat_and_rates_are_medians(bench):
    # repeat 0 ran on a quiet machine, repeat 1 on a loaded one (everything slower)
    wall = {(0, 0.0): 2.0, (0, 0.5): 1.0, (1, 0.0): 8.0, (1, 0.5): 5.0,
            (2, 0.0): 4.0, (2, 0.5): 3.0}
    rows = [{"repeat": k, "ratio": r, "wall_s": w, "cpu_s": w / 2} for (k, r), w in wall.items()]

    table = cells(bench.speed_table(rows, batch_size=10, steps=2, baseline=0.0))

    # per repeat 2.0, 1.6 and 1.33: median 1.6 (the ratio of the median times would be 1.33)
    assert table["0.5"][2] == "1.60x (1.33–2.00)"
    assert table["0"][2] == "1.00x (1.00–1.00)"
    assert table["0.5"][0] == "6.7"  # samples/s 20, 4, 6.7
    assert table["0.5"][1] == "75.00"  # CPU 0.5, 2.5, 1.5 s for 20 samples: 25, 125, 75 ms
    assert table["0.5"][3] == "20.0, 4.0, 6.7"
