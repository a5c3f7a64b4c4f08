"""`vlp train` end to end on a small ShapesWorld: loss falls, checkpoints, resume, 2 processes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlp.checkpoint import latest_checkpoint, list_checkpoints
from vlp.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "shapesworld-tiny.yaml"

pytestmark = pytest.mark.slow


def small_run(tmp_path: Path, cache: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={cache}",
        "data.synth.num_train=1200",
        "data.synth.num_eval=96",
        "data.synth.samples_per_shard=300",
        "data.batch_size=32",
        "data.num_workers=0",
        "data.shuffle_buffer=200",
        "optim.warmup_steps=5",
        "optim.lr=2e-3",
        "train.log_every=2",
        "train.trackers=[jsonl]",
        "eval.batch_size=64",
        *extra,
    ]


def vlp(*args: str, launcher: tuple[str, ...] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "vlp", *args] if launcher else [sys.executable, "-m", "vlp", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def cache(shapesworld_cache):
    return shapesworld_cache


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> tuple[Path, subprocess.CompletedProcess]:
    """One 40-step run (checkpoints at steps 20 and 40) and its output: the tests that read it
    share it, and those that train on from it copy its folder first."""
    folder = tmp_path_factory.mktemp("trained")
    proc = vlp("train", str(RECIPE), *small_run(folder, cache, "train.steps=40",
                                                "checkpoint.every=20"))
    return folder / "run", proc


def test_training_lowers_the_loss_and_writes_the_report(trained):
    run, proc = trained
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records][-1] == 40
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(run)] == ["step-000000020", "step-000000040"]
    result = json.loads((run / "eval" / "step-000000040" / "zeroshot.json").read_text())
    assert result["task"] == "zeroshot_classification"
    assert set(result["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall"}
    assert f"report: {run / 'report.md'}" in proc.stdout
    # binding, not only naming: the end-of-run report adds ShapesWorld's binding subsets
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"zeroshot", "zeroshot_heldout", "sugarcrepe", "train"}
    binding = results["sugarcrepe"]
    assert {"swap_att", "swap_obj", "replace_rel"} <= set(binding) and "add_att" not in binding
    assert all(0.0 <= binding[s] <= 1.0 for s in ("swap_att", "swap_obj", "replace_rel"))
    assert "swap_att" in (run / "report.md").read_text()


def test_resume_continues_from_the_saved_step(tmp_path, cache, trained):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)  # saved at step 40, the last step of its 40
    proc = vlp("train", str(RECIPE), *small_run(tmp_path, cache, "train.steps=44",
                                                "checkpoint.every=2"))
    assert "resumed from" in proc.stdout + proc.stderr and "at step 40" in proc.stdout + proc.stderr
    assert latest_checkpoint(run).name == "step-000000044"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    # the second run logged only the steps after 40
    assert steps == [*range(2, 41, 2), 42, 44]
    # each run's end-of-run evaluation reaches the trackers too
    assert [r["step"] for r in records if "eval/zeroshot/acc1" in r] == [40, 44]
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["step"] == 44 and state["samples_seen"] == 44 * 32


def test_two_process_gloo_run_trains_and_checkpoints(tmp_path, cache):
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no")
    vlp("train", str(RECIPE), *small_run(tmp_path, cache, "train.steps=4", "checkpoint.every=4"),
        launcher=launcher)
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-000000004"]
    state = json.loads((run / "step-000000004" / "trainer_state.json").read_text())
    assert state["samples_seen"] == 4 * 32 * 2  # both ranks' batches count


def test_config_error_fails_before_training_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlp", "train", str(RECIPE), "train.stpes=3",
                           f"output_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "vlp train: error: unknown key 'train.stpes'; train accepts: steps, grad_accum, "
        "grad_cache, mixed_precision, seed, log_every, trackers, max_nonfinite_steps, "
        "diagnostics_every"]
    assert not (tmp_path / "run").exists()


def test_sigterm_saves_a_checkpoint_of_that_step_and_exits(tmp_path, cache):
    args = small_run(tmp_path, cache, "train.steps=100000", "checkpoint.every=100000",
                     "train.log_every=1")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlp", "train", str(RECIPE), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    match = re.search(r"stopped by signal at step (\d+)", out)
    assert match, out[-3000:]
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == f"step-{int(match.group(1)):09d}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == int(match.group(1))


def test_eval_suite_runs_during_training_and_its_metrics_reach_the_trackers(tmp_path, cache):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: during-training\n"
        "shapesworld: {}\n"
        "benchmarks:\n"
        "  - {name: zeroshot, task: zeroshot, data: '${shapesworld}/zeroshot'}\n"
        "  - {name: gap, task: gap, data: '${shapesworld}/retrieval'}\n"
    )
    vlp("train", str(RECIPE), *small_run(tmp_path, cache, "train.steps=4", "checkpoint.every=4",
                                         f"eval.suite={suite}", "eval.every=2"))
    run = tmp_path / "run"
    logged = [r for r in read_metrics(run / "metrics.jsonl") if "eval/zeroshot/acc1" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(0.0 <= r["eval/zeroshot/acc1"] <= 1.0 and r["eval/gap/gap"] > 0
               for r in logged)
    for step in (2, 4):
        folder = run / "eval" / f"step-{step:09d}"
        assert json.loads((folder / "zeroshot.json").read_text())["task"] == (
            "zeroshot_classification")
        assert (folder / "report.md").is_file()


def test_two_process_ring_run_with_gradient_cache_trains(tmp_path, cache):
    """2 ranks × 2 micro-batches of 16: each step is one 64-row contrastive batch."""
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no")
    vlp("train", str(RECIPE), *small_run(tmp_path, cache, "train.steps=12", "checkpoint.every=12",
                                         "data.batch_size=16", "train.grad_accum=2",
                                         "train.grad_cache=true", "loss.backend=ring",
                                         "train.log_every=1"),
        launcher=launcher)
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    first, last = (sum(r["loss"] for r in part) / 3 for part in (records[:3], records[-3:]))
    assert last < 0.95 * first, (first, last)
    state = json.loads((run / "step-000000012" / "trainer_state.json").read_text())
    assert state["samples_seen"] == 12 * 64
    assert json.loads((run / "eval" / "step-000000012" / "zeroshot.json").read_text())["task"] == (
        "zeroshot_classification")
