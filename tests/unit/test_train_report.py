"""The end-of-run report says what was evaluated, and how many training samples were skipped."""

import json
from pathlib import Path

from vlp.eval.results import BenchmarkResult
from vlp.eval.runner import SuiteResult
from vlp.eval.suite import BenchmarkSpec, Suite
from vlp.train.report import write_run_report


def write_metrics(run_dir, skipped: int) -> None:
    records = [{"step": 1, "loss": 2.0, "samples_seen": 8, "skipped_samples": 0},
               {"step": 2, "loss": 1.5, "samples_seen": 16, "skipped_samples": skipped}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_without_a_zero_shot_set_the_report_says_so_and_how_to_add_one(tmp_path):
    write_metrics(tmp_path, skipped=3)
    text = write_run_report(tmp_path, None).read_text()
    assert "No zero-shot set was evaluated" in text and "eval.zeroshot=FOLDER" in text
    assert "Skipped 3 unusable training samples" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == {"train": {"step": 2, "samples_seen": 16, "skipped_samples": 3}}


def test_each_evaluated_set_is_named_with_its_folder(tmp_path, monkeypatch):
    import vlp.train.report as report_module

    metrics = {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5}
    spec = BenchmarkSpec(name="zeroshot", task="zeroshot", data=tmp_path / "zs", options=None)
    final = SuiteResult(suite=Suite(name="end", benchmarks=(spec,)),
                        results={"zeroshot": BenchmarkResult(metrics=metrics)}, seconds={},
                        out_dir=tmp_path / "eval", model_name="m", pretrained=None, device="cpu")
    monkeypatch.setattr(report_module, "write_report",
                        lambda run, path: Path(path).write_text("# suite report\n"))
    write_metrics(tmp_path, skipped=0)
    text = write_run_report(tmp_path, final).read_text()
    assert f"`zeroshot` ({tmp_path / 'zs'})" in text and "Skipped 0 unusable" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["zeroshot"] == metrics and results["train"]["skipped_samples"] == 0
