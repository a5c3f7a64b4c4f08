"""Training diagnostics: hand-checkable values on known features, and a tiny run that logs them
at the interval only, with the plot in its report."""

import math

import pytest
import torch
import torch.nn.functional as F

import vlp.train.trainer as trainer_module
from vlp.config import ConfigError, TrainConfig, load_config
from vlp.train.diagnostics import diagnostics_due, step_diagnostics
from vlp.train.loop import train
from vlp.train.metrics import read_metrics
from vlp.train.report import DIAGNOSTICS_PNG


def unit_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def scalars(output: dict) -> dict[str, float]:
    return {k: v.item() for k, v in step_diagnostics(output).scalars.items()}


def test_identical_image_and_text_features_have_no_gap_and_perfect_alignment():
    x = unit_rows(16, 8)
    got = scalars({"image_features": x, "text_features": x.clone(),
                   "logit_scale": torch.tensor(20.0)})
    assert got["diag/gap"] == pytest.approx(0.0, abs=1e-6)
    assert got["diag/alignment"] == pytest.approx(0.0, abs=1e-6)
    assert got["diag/pos_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert got["diag/uniformity_image"] == pytest.approx(got["diag/uniformity_text"], abs=1e-6)
    assert got["diag/temperature"] == pytest.approx(1 / 20)
    assert "diag/logit_bias" not in got and "diag/hard_neg_above_pos" not in got


def test_orthonormal_pairs_match_hand_computed_values():
    # images e0, e1; texts e2, e3: every cosine is 0, centroids (½,½,0,0) and (0,0,½,½)
    eye = torch.eye(4)
    got = scalars({"image_features": eye[:2], "text_features": eye[2:],
                   "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-10.0)})
    assert got["diag/gap"] == pytest.approx(1.0)  # ‖(½,½,−½,−½)‖
    assert got["diag/alignment"] == pytest.approx(2.0)  # ‖x_i − y_i‖² = 2
    assert got["diag/pos_cosine"] == pytest.approx(0.0)
    assert got["diag/neg_cosine"] == pytest.approx(0.0)
    assert got["diag/uniformity_image"] == pytest.approx(-4.0)  # log exp(−2·2)
    assert got["diag/logit_bias"] == pytest.approx(-10.0)


def test_share_of_hard_negatives_above_the_positive():
    x = torch.eye(3)[:2]  # two images
    y = F.normalize(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]), dim=-1)  # cosines 0.707
    negatives = torch.stack([torch.eye(3)[[0, 2]],  # image 0: cosine 1 (above), 0 (below)
                             torch.eye(3)[[2, 2]]])  # image 1: cosine 0, 0 (below)
    got = scalars({"image_features": x, "text_features": y, "logit_scale": torch.tensor(1.0),
                   "neg_text_features": negatives})
    assert got["diag/hard_neg_above_pos"] == pytest.approx(1 / 4)


def test_histograms_hold_the_positive_and_off_diagonal_similarities():
    x, y = unit_rows(10, 6, seed=1), unit_rows(10, 6, seed=2)
    histograms = step_diagnostics({"image_features": x, "text_features": y,
                                   "logit_scale": torch.tensor(1.0)}).histograms
    similarities = x @ y.T
    assert torch.allclose(histograms["diag/pos_similarity"], similarities.diagonal())
    assert len(histograms["diag/neg_similarity"]) == 90
    mean_negative = (similarities.sum() - similarities.trace()) / 90
    assert histograms["diag/neg_similarity"].mean().item() == pytest.approx(mean_negative.item())


def test_a_single_row_micro_batch_has_no_diagnostics_rather_than_failing():
    x = unit_rows(1, 4)
    diagnostics = step_diagnostics({"image_features": x, "text_features": x,
                                    "logit_scale": torch.tensor(1.0)})
    assert diagnostics.scalars == {} and diagnostics.histograms == {}


def test_diagnostics_are_due_every_n_steps_and_never_when_off():
    assert [s for s in range(1, 13) if diagnostics_due(4, s)] == [4, 8, 12]
    assert not any(diagnostics_due(0, s) for s in range(1, 13))
    with pytest.raises(ConfigError, match="train.diagnostics_every"):
        TrainConfig(diagnostics_every=-1)


def test_a_tiny_run_logs_diagnostics_at_the_interval_only_and_plots_them(tmp_path, monkeypatch):
    computed = []
    real = trainer_module.step_diagnostics

    def counting(output):
        computed.append(len(output["image_features"]))
        return real(output)

    monkeypatch.setattr(trainer_module, "step_diagnostics", counting)
    run = tmp_path / "run"
    cfg = load_config(None, [
        f"output_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", "model.name=vlp-tiny",
        "data.synth.num_train=256", "data.synth.num_eval=32", "data.synth.samples_per_shard=128",
        "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=32",
        "train.steps=10", "train.log_every=5", "train.diagnostics_every=4",
        "train.grad_accum=2", "train.trackers=[jsonl,tensorboard]", "checkpoint.every=100",
        "eval.batch_size=32"])
    result = train(cfg)
    assert computed == [16, 16]  # steps 4 and 8 only, on one micro-batch (16 rows, not 32)
    records = read_metrics(run / "metrics.jsonl")
    diagnosed = [r["step"] for r in records if "diag/gap" in r]
    assert diagnosed == [4, 8]
    assert [r["step"] for r in records if "loss" in r] == [4, 5, 8, 10]
    last = next(r for r in records if r["step"] == 8)
    assert 0 <= last["diag/gap"] <= 2 and -1 <= last["diag/neg_cosine"] <= 1
    assert last["diag/alignment"] == pytest.approx(2 - 2 * last["diag/pos_cosine"], abs=1e-5)
    assert last["diag/temperature"] == pytest.approx(1 / last["logit_scale"], rel=1e-3)
    assert not math.isnan(last["diag/uniformity_text"])
    assert (run / DIAGNOSTICS_PNG).stat().st_size > 0
    report = result.report.read_text()
    assert f"![training diagnostics]({DIAGNOSTICS_PNG})" in report and "Step 8: gap" in report
    events = list(run.rglob("events.out.tfevents*"))
    assert events and any(b"diag/neg_similarity" in e.read_bytes() for e in events)
