"""`vlp train` on each tiny objective recipe (and the FLIP one) for 3 steps: it finishes and
logs finite terms.

Runs the real CLI entry point in-process (one import of torch/open_clip for all recipes) on a
small ShapesWorld generated once into a module-wide cache. The end-of-run zero-shot report runs
on that ShapesWorld's zero-shot set cut to one prompt template, to keep the runs short.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from vlp.cli import main
from vlp.config import load_config
from vlp.data.cache import prepare_shapesworld
from vlp.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.synth.num_train=600", "data.synth.num_eval=64", "data.synth.samples_per_shard=300"]

pytestmark = pytest.mark.slow

TERMS = {
    "shapesworld-tiny-siglip.yaml": {"siglip"},
    "shapesworld-tiny-coca.yaml": {"coca_contrastive", "coca_caption"},
    "shapesworld-tiny-negclip.yaml": {"negclip"},
    "shapesworld-tiny-gap.yaml": {"clip", "align", "uniform_image", "uniform_text",
                                  "uniform_cross"},
    "shapesworld-tiny-dcl.yaml": {"clip"},
    "shapesworld-tiny-cwcl.yaml": {"cwcl"},
    "shapesworld-tiny-fixed-temp.yaml": {"clip"},
    "shapesworld-tiny-temp-schedule.yaml": {"clip"},
    "shapesworld-tiny-flip.yaml": {"clip"},
    "shapesworld-tiny-multipos.yaml": {"multipos"},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(cache_dir with the small ShapesWorld, its zero-shot set with one template)."""
    cache = tmp_path_factory.mktemp("shapesworld-cache")
    synth = load_config(ROOT / "recipes" / "shapesworld-tiny.yaml", SMALL).data.synth
    root = prepare_shapesworld(cache, dataclasses.asdict(synth), progress=False)
    zeroshot = tmp_path_factory.mktemp("zeroshot") / "one-template"
    shutil.copytree(root / "zeroshot", zeroshot)
    templates = zeroshot / "zeroshot_classification_templates.txt"
    templates.write_text(templates.read_text().splitlines()[0] + "\n")
    return cache, zeroshot


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; forget the previous run's state."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("recipe", sorted(TERMS))
def test_tiny_objective_recipe_trains_three_steps_with_finite_terms(
    recipe, tmp_path, data, fresh_accelerate_state
):
    cache, zeroshot = data
    run = tmp_path / "run"
    code = main([
        "train", str(ROOT / "recipes" / recipe), *SMALL,
        "train.steps=3", "train.log_every=1", "train.trackers=[jsonl]",
        "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=64",
        "checkpoint.every=3", "eval.batch_size=64", f"eval.zeroshot={zeroshot}",
        f"output_dir={run}", f"data.cache_dir={cache}",
    ])
    assert code == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        logged = {k.removeprefix("loss_") for k in record if k.startswith("loss_")}
        assert logged == TERMS[recipe], record
        for name in ("loss", *(f"loss_{t}" for t in TERMS[recipe])):
            assert math.isfinite(record[name]), (name, record)
        assert record["skipped_steps"] == 0
    assert (run / "report.md").is_file()
