"""`vlp train` with a damaged newest checkpoint: the run resumes from the previous good one
(here a milestone that keep_last alone would have pruned) and never deletes it."""

import pytest

from tests.smoke.test_train_cli import RECIPE, small_run, vlp
from vlp.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_good_one(tmp_path,
                                                                         shapesworld_cache):
    cache = shapesworld_cache
    checkpoints = ("checkpoint.every=2", "checkpoint.keep_last=1", "checkpoint.milestones=[2]")
    vlp("train", str(RECIPE), *small_run(tmp_path, cache, "train.steps=4", *checkpoints))
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-000000002", "step-000000004"]
    weights = run / "step-000000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a bit flip on disk: same size, still a readable safetensors file
    weights.write_bytes(bytes(data))

    proc = vlp("train", str(RECIPE), *small_run(tmp_path, cache, "train.steps=6", *checkpoints))

    out = proc.stdout + proc.stderr
    assert "skipping checkpoint step-000000004 (moved to step-000000004.broken)" in out
    assert "sha256 differs" in out, out[-3000:]
    assert f"resumed from {run / 'step-000000002'} at step 2" in out
    assert [p.name for p in list_checkpoints(run)] == ["step-000000002", "step-000000006"]
    assert (run / "step-000000004.broken" / "model.safetensors").read_bytes() == bytes(data)
