"""Post-hoc gap removal (GR-CLIP): centring closes the reference set's gap, zero-shot and
retrieval report both numbers when asked (and only then), and an export can carry the means."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.checkpoints import write_random_checkpoint
from vlp.cli import main
from vlp.config import SynthConfig
from vlp.data.cache import prepare_shapesworld
from vlp.eval.gap import pair_statistics
from vlp.eval.gap_removal import GAP_MEANS_FILE, SUFFIX, ModalityMeans
from vlp.models import model_config


def offset_pairs(n: int = 400, d: int = 32, seed: int = 0):
    """Two modalities on opposite sides of the sphere along axis 0: a wide gap."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.zeros(d)
    offset[0] = 1.5
    return (F.normalize(torch.randn(n, d, generator=g) + offset, dim=-1),
            F.normalize(torch.randn(n, d, generator=g) - offset, dim=-1))


def test_centring_by_the_reference_means_closes_the_reference_sets_gap():
    x, y = offset_pairs()
    means = ModalityMeans.of(x, y)
    before = pair_statistics(x.double(), y.double())["gap"].item()
    assert means.gap == pytest.approx(before)
    centred_x, centred_y = means.centre_images(x), means.centre_texts(y)
    assert torch.allclose(centred_x.norm(dim=-1), torch.ones(len(x)))  # still unit vectors
    after = pair_statistics(centred_x.double(), centred_y.double())["gap"].item()
    assert before > 0.4 and after < 0.05 * before  # 0 up to the re-normalisation


def test_means_from_another_set_do_not_close_this_sets_gap():
    x, y = offset_pairs()
    other = ModalityMeans.of(*offset_pairs(seed=1)[::-1])  # image and text swapped: wrong side
    after = pair_statistics(other.centre_images(x).double(),
                            other.centre_texts(y).double())["gap"].item()
    assert after > pair_statistics(x.double(), y.double())["gap"].item()


def test_means_round_trip_through_their_json_file(tmp_path):
    means = ModalityMeans.of(*offset_pairs(n=20, d=8))
    loaded = ModalityMeans.load(means.save(tmp_path / GAP_MEANS_FILE, reference="here"))
    assert torch.equal(loaded.image, means.image) and torch.equal(loaded.text, means.text)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("run") / "step-000000000")


@pytest.fixture(scope="module")
def shapesworld(tmp_path_factory) -> Path:
    params = dataclasses.asdict(SynthConfig(num_train=8, num_eval=48, samples_per_shard=48))
    return prepare_shapesworld(tmp_path_factory.mktemp("cache"), params, progress=False)


def evaluate(checkpoint: Path, task: str, data: Path, out: Path, *options: str) -> dict:
    args = ["eval", "--checkpoint", str(checkpoint), "--task", task, "--data", str(data),
            "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(args + [a for o in options for a in ("--option", o)]) == 0
    return json.loads((out / "results.json").read_text())["benchmarks"][task]["metrics"]


@pytest.mark.parametrize(("task", "folder", "headline"), [
    ("zeroshot", "zeroshot", "acc1"), ("retrieval", "retrieval", "image_retrieval_recall@5")])
def test_zeroshot_and_retrieval_report_both_numbers_with_gap_removal_on(
        checkpoint, shapesworld, tmp_path, task, folder, headline):
    plain = evaluate(checkpoint, task, shapesworld / folder, tmp_path / "plain")
    both = evaluate(checkpoint, task, shapesworld / folder, tmp_path / "both", "gap_removal=true")

    assert not any(k.endswith(SUFFIX) for k in plain)  # off by default
    assert {k: both[k] for k in plain} == plain  # the as-is numbers are unchanged
    assert set(both) == {*plain, *(k + SUFFIX for k in plain), "gap_removal_reference_gap"}
    assert all(0.0 <= both[k + SUFFIX] <= 1.0 for k in plain if "recall" in k or "acc" in k)
    assert both["gap_removal_reference_gap"] > 0
    report = (tmp_path / "both" / "report.md").read_text()
    assert f"| {headline}{SUFFIX} |" in report and f"| {headline} |" in report
    assert "gap removal (GR-CLIP" in report


def test_export_stores_the_modality_means_of_a_reference_root(checkpoint, shapesworld, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "open_clip",
                 "--out", str(out), "--gap-reference", str(shapesworld / "retrieval")]) == 0
    means = ModalityMeans.load(out / GAP_MEANS_FILE)
    assert means.image.shape == means.text.shape == (model_config("vlp-tiny")["embed_dim"],)
    assert means.gap > 0
    assert "retrieval" in json.loads((out / GAP_MEANS_FILE).read_text())["reference"]
