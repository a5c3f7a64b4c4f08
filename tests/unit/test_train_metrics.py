"""metrics.jsonl survives a torn last line (a full disk, a kill mid-write)."""

import json

from vlp.train.metrics import JSONLTracker, read_metrics, repair_torn_tail

GOOD = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n'


def test_a_torn_last_line_is_skipped_when_reading(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(GOOD + '{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]


def test_the_next_run_cuts_the_torn_line_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(GOOD + '{"step": 3, "lo')
    tracker = JSONLTracker("vlp", tmp_path)
    tracker.log({"loss": 2.0}, step=3)
    tracker.finish()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}, {"step": 3, "loss": 2.0}]


def test_a_complete_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(GOOD + '{"step": 3, "loss": 2.0}')
    repair_torn_tail(path)
    assert path.read_text() == GOOD + '{"step": 3, "loss": 2.0}\n'


def test_a_file_that_is_one_torn_line_becomes_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lo')
    repair_torn_tail(path)
    assert path.read_text() == "" and read_metrics(path) == []


def test_an_intact_file_is_left_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(GOOD)
    repair_torn_tail(path)
    assert path.read_text() == GOOD


def test_a_bad_line_in_the_middle_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo{"step": 3, "loss": 2.0}\n'
                    '{"step": 4, "loss": 1.5}\n')
    assert [r["step"] for r in read_metrics(path)] == [1, 4]
    assert f"{path}:2: skipping a line" in caplog.text
