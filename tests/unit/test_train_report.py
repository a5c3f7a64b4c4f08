"""The end-of-run report says what was evaluated, and how many training samples were skipped."""

import json
from types import SimpleNamespace

import torch

import vlp.train.report as report_module
from vlp.train.report import write_report


def write_metrics(run_dir, skipped: int) -> None:
    records = [{"step": 1, "loss": 2.0, "samples_seen": 8, "skipped_samples": 0},
               {"step": 2, "loss": 1.5, "samples_seen": 16, "skipped_samples": skipped}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_without_a_zero_shot_set_the_report_says_so_and_how_to_add_one(tmp_path):
    write_metrics(tmp_path, skipped=3)
    report = write_report(tmp_path, torch.nn.Linear(2, 2), None, {}, batch_size=4)
    text = report.read_text()
    assert "No zero-shot set was evaluated" in text and "eval.zeroshot=FOLDER" in text
    assert "| set |" not in text
    assert "Skipped 3 unusable training samples" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == {"train": {"step": 2, "samples_seen": 16, "skipped_samples": 3}}


def test_each_evaluated_set_is_named_with_its_folder(tmp_path, monkeypatch):
    metrics = {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5}
    monkeypatch.setattr(report_module, "evaluate_zeroshot", lambda *a, **k: metrics)
    write_metrics(tmp_path, skipped=0)
    bundle = SimpleNamespace(tokenizer=None, preprocess_val=None)
    text = write_report(tmp_path, torch.nn.Linear(2, 2), bundle,
                        {"zeroshot": tmp_path / "zs"}, batch_size=4).read_text()
    assert f"`zeroshot` ({tmp_path / 'zs'})" in text and "| zeroshot | 0.5000 |" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["zeroshot"] == metrics and results["train"]["skipped_samples"] == 0
