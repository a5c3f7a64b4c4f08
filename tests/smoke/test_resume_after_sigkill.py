"""A run killed with SIGKILL resumes from its last checkpoint as if it had never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.shapesworld_cache import SYNTH
from vlp.checkpoint import latest_checkpoint, list_checkpoints
from vlp.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "shapesworld-tiny.yaml"
STEPS, EVERY, BATCH = 8, 2, 32

pytestmark = pytest.mark.slow


def tiny_run(run_dir: Path, cache: Path) -> list[str]:
    return [
        sys.executable, "-m", "vlp", "train", str(RECIPE),
        f"output_dir={run_dir}", f"data.cache_dir={cache}",
        *(f"data.synth.{key}={value}" for key, value in SYNTH.items()),
        f"data.batch_size={BATCH}", "data.num_workers=0", "data.shuffle_buffer=200",
        "optim.warmup_steps=5", "optim.lr=2e-3", f"train.steps={STEPS}", "train.log_every=1",
        "train.trackers=[jsonl]", f"checkpoint.every={EVERY}", "checkpoint.keep_last=10",
        "eval.batch_size=64",
    ]


ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def run_to_end(args: list[str]) -> str:
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def data_offset(ckpt: Path) -> int:
    """Samples of its first round the single stream had used when `ckpt` was saved."""
    data = json.loads((ckpt / "trainer_state.json").read_text())["data"]
    (rank,) = data["ranks"]
    round_, offset, _skipped = rank["streams"]["0"]
    assert round_ == 0
    return offset


def test_sigkilled_run_resumes_with_the_same_losses(tmp_path, shapesworld_cache):
    cache, reference, killed = shapesworld_cache, tmp_path / "reference", tmp_path / "killed"
    # both runs below find their data ready in the cache
    uninterrupted = subprocess.Popen(tiny_run(reference, cache), cwd=ROOT, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(tiny_run(killed, cache), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(killed) is None:
        assert proc.poll() is None and time.time() < deadline, "run ended before a checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = latest_checkpoint(killed)
    killed_at = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert 0 < killed_at < STEPS, f"the kill came too late (step {killed_at})"
    # each step used one batch: the stream position is past every sample those steps read
    assert data_offset(saved) == killed_at * BATCH

    out = run_to_end(tiny_run(killed, cache))
    log, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, log[-3000:]
    assert f"at step {killed_at}" in out, out[-3000:]
    assert [p.name for p in list_checkpoints(killed)][-1] == f"step-{STEPS:09d}"

    expected, resumed = losses(reference), losses(killed)
    later = [step for step in expected if step > killed_at]
    assert later and later[-1] == STEPS
    # the resumed run read the samples the uninterrupted one read at those steps (were the
    # data to restart from its first sample, these losses would differ)
    for step in later:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert data_offset(latest_checkpoint(killed)) == data_offset(latest_checkpoint(reference))
