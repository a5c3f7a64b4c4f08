"""`vlp train` on your own shards: the recipe's source is replaced, damaged samples are counted
exactly in report.md and results.json, and a run that cannot read its data ends in one line."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.unit.streaming_helpers import png_bytes

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "shapesworld-tiny.yaml"

pytestmark = pytest.mark.slow


def vlp_train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vlp", "train", str(RECIPE), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def write_planted_shard(path: Path) -> None:
    """8 good samples, and before the last of them 3 lost ones: a repeated key, a sample whose
    caption header is garbled, and a sample whose two headers are both garbled."""
    layout = [f"good{i}" for i in range(4)] + ["good1", "capless", "good4", "vanished"] + \
        [f"good{i}" for i in range(5, 8)]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(layout):
            for ext, data in (("png", png_bytes(i, size=16)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        garbled = [tar.getmember(n).offset for n in ("capless.txt", "vanished.png", "vanished.txt")]
    data = bytearray(path.read_bytes())
    for offset in garbled:
        data[offset:offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))


def common(tmp_path: Path) -> list[str]:
    return [f"output_dir={tmp_path / 'run'}", "data.mode=epoch", "data.batch_size=8",
            "data.num_workers=0", "data.shuffle_buffer=0", "train.steps=1",
            "train.trackers=[jsonl]", "train.log_every=1", "optim.warmup_steps=0"]


def test_own_shards_replace_the_recipes_and_the_report_counts_the_lost_samples(tmp_path):
    shard = tmp_path / "planted.tar"
    write_planted_shard(shard)
    proc = vlp_train(f"data.shards=pipe:cat {shard}", *common(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"reading shards through the shell command: cat {shard}" in proc.stderr

    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results == {"train": {"step": 1, "samples_seen": 8, "skipped_samples": 3}}
    report = (run / "report.md").read_text()
    assert "Skipped 3 unusable training samples" in report
    assert "No zero-shot set was evaluated" in report and "eval.zeroshot=FOLDER" in report


def test_a_run_without_one_usable_sample_ends_in_one_error_line(tmp_path):
    shard = tmp_path / "captionless.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"k{i}.png")
            data = png_bytes(i)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    proc = vlp_train(f"data.shards={shard}", *common(tmp_path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("vlp train: error: data: stream 0")
    assert "no usable sample" in errors[0]
