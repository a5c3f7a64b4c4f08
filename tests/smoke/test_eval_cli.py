"""`vlp eval` end to end: a random vlp-tiny checkpoint folder on a small ShapesWorld; the whole
default suite in a fresh process as a user runs it, then one benchmark and a bad suite through
`vlp.cli.main` in this process (same code path, without paying the imports again)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import write_random_checkpoint
from vlp.cli import main

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "eval" / "suites" / "shapesworld.yaml"
BENCHMARKS = ["zeroshot", "zeroshot_heldout", "retrieval", "sugarcrepe", "aro", "order", "gap"]
JSON_KEYS = {"dataset", "model", "pretrained", "task", "metrics"}
UNBOUNDED = {"uniformity_image", "uniformity_text", "uniformity_cross", "effective_rank_image",
             "effective_rank_text", "gap", "alignment", "matched_cosine", "cone_image",
             "cone_text", "mean_positive_similarity", "mean_negative_similarity"}

pytestmark = pytest.mark.slow


def vlp(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "vlp", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """What training writes, minus the optimizer: weights, model_config.json, manifest.json."""
    return write_random_checkpoint(tmp_path_factory.mktemp("run") / "step-000000000")


@pytest.fixture(scope="module")
def suite_run(checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("out")
    vlp("eval", "--checkpoint", str(checkpoint), "--suite", str(SUITE), "--out", str(out),
        "--quiet", "shapesworld.params.num_eval=64", "shapesworld.params.num_train=1",
        f"shapesworld.cache_dir={cache}", "batch_size=128")
    (root,) = cache.glob("shapesworld-*")
    return out, root


def test_suite_writes_one_clip_benchmark_json_per_benchmark(suite_run, checkpoint):
    out, _ = suite_run

    for name in BENCHMARKS:
        record = json.loads((out / f"{name}.json").read_text())
        assert JSON_KEYS <= set(record), name
        assert record["dataset"] == name and record["model"] == str(checkpoint)
        assert record["metrics"], name


def test_suite_metrics_are_in_range(suite_run):
    out, _ = suite_run
    summary = json.loads((out / "results.json").read_text())

    assert list(summary["benchmarks"]) == BENCHMARKS
    for name, bench in summary["benchmarks"].items():
        for metric, value in bench["metrics"].items():
            assert value is not None and math.isfinite(value), (name, metric)
            if metric not in UNBOUNDED:
                assert 0.0 <= value <= 1.0, (name, metric, value)
    gap = summary["benchmarks"]["gap"]["metrics"]
    assert 0.0 <= gap["gap"] <= 2.0
    assert 1.0 <= gap["effective_rank_image"] <= 128 and 1.0 <= gap["effective_rank_text"] <= 128
    assert summary["benchmarks"]["zeroshot"]["metrics"]["acc5"] >= (
        summary["benchmarks"]["zeroshot"]["metrics"]["acc1"])


def test_suite_report_has_every_section_and_its_plots(suite_run):
    out, _ = suite_run
    report = (out / "report.md").read_text()

    for name in BENCHMARKS:
        assert f"## {name} (" in report
    for png in ("sugarcrepe/sugarcrepe.png", "aro/aro.png", "order/order.png", "gap/gap_pca.png",
                "gap/gap_similarity.png"):
        assert f"](plots/{png})" in report
        assert (out / "plots" / png).stat().st_size > 1000
    assert "word classes tagged by" in report


def test_one_task_on_its_data_folder(suite_run, checkpoint, tmp_path, capsys):
    _, root = suite_run

    code = main(["eval", "--checkpoint", str(checkpoint), "--task", "sugarcrepe", "--data",
                 str(root / "sugarcrepe"), "--out", str(tmp_path), "--quiet"])

    assert code == 0
    record = json.loads((tmp_path / "sugarcrepe.json").read_text())
    assert record["task"] == "sugarcrepe"
    assert 0.0 <= record["metrics"]["mean"] <= 1.0 and "mean_itt" in record["metrics"]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "results.json").is_file()
    assert "sugarcrepe" in capsys.readouterr().out


def test_a_missing_suite_path_fails_fast_with_the_key_named(checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("VLP_PATH_IMAGENET1K", raising=False)

    code = main(["eval", "--checkpoint", str(checkpoint), "--suite",
                 str(ROOT / "eval" / "suites" / "standard.yaml"), "--only", "imagenet1k"])

    assert code == 2
    err = capsys.readouterr().err
    assert "benchmarks[0] (imagenet1k).data" in err and "--path imagenet1k=" in err
