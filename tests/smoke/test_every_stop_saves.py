"""Every stop saves: a signal to the whole process group (DataLoader workers included) ends
`vlp train` after the step with a checkpoint that resumes; a second run on the same folder is
refused; a diverging run never checkpoints non-finite weights; a resumed run trains with the
optim settings its config.yaml records."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.shapesworld_cache import SYNTH
from vlp.checkpoint import latest_checkpoint, list_checkpoints
from vlp.train.metrics import read_metrics
from vlp.train.optim import warmup_cosine
from vlp.train.run_lock import RunLock

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "shapesworld-tiny.yaml"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(shapesworld_cache):
    return shapesworld_cache


def train_args(run: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "vlp", "train", str(RECIPE), f"output_dir={run}",
        f"data.cache_dir={cache}", *(f"data.synth.{k}={v}" for k, v in SYNTH.items()),
        "data.batch_size=32", "data.num_workers=1", "data.shuffle_buffer=200",
        "optim.warmup_steps=5", "optim.lr=2e-3", "train.log_every=1", "train.trackers=[jsonl]",
        "eval.batch_size=64", *extra,
    ]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def process_group(pgid: int) -> list[int]:
    """The pids whose process group is `pgid`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, cache) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (trained with lr 2e-3 and
    weight_decay 0.1); the tests that train on from it copy it first (see `copy_of`)."""
    run_dir = tmp_path_factory.mktemp("four-steps") / "run"
    first = run(train_args(run_dir, cache, "train.steps=4", "checkpoint.every=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000000002", "step-000000004"]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(read_metrics(path)) if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1],
                         ids=lambda s: s.name)
def test_a_signal_to_the_process_group_saves_a_checkpoint_that_resumes(tmp_path, cache, signum):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, cache, "train.steps=100000", "checkpoint.every=100000")
    with (tmp_path / "log").open("w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=log, stderr=log,
                                start_new_session=True)
        deadline = time.time() + 240
        while logged_steps(run_dir) < 2:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)
        assert len(process_group(proc.pid)) >= 2  # the main process and its DataLoader worker
        os.killpg(proc.pid, signum)
        proc.wait(timeout=120)
    out = (tmp_path / "log").read_text()
    assert proc.returncode == 128 + signum, out[-3000:]
    assert "Traceback" not in out and "killed by signal" not in out, out[-3000:]
    saved = latest_checkpoint(run_dir)
    assert saved is not None, out[-3000:]
    step = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert step >= 2 and f"stopped by signal at step {step}" in out

    resumed = run(train_args(run_dir, cache, f"train.steps={step + 1}",
                             "checkpoint.every=100000"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved} at step {step}" in resumed.stdout + resumed.stderr
    assert latest_checkpoint(run_dir).name == f"step-{step + 1:09d}"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")][-1] == step + 1


# `vlp train` whose checkpoint save is stuck: it touches the marker file, then sleeps
STUCK_SAVE = """
import pathlib, sys, time
from vlp import cli
from vlp.train.trainer import Trainer

def stuck_save(self):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(300)
    return False

Trainer.save = stuck_save
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_second_ctrl_c_while_saving_exits_at_once_with_one_line(tmp_path, cache):
    run_dir, saving = tmp_path / "run", tmp_path / "saving"
    args = train_args(run_dir, cache, "train.steps=100000", "checkpoint.every=100000")
    proc = subprocess.Popen([sys.executable, "-c", STUCK_SAVE, str(saving), *args[3:]],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while logged_steps(run_dir) < 1:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    while not saving.exists():  # the first Ctrl-C ends the step and starts the (stuck) save
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)  # well before the stuck save would return
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "stopping after this step; Ctrl-C again to exit now" in err
    assert "\nvlp train: interrupted\n" in err, err[-3000:]
    assert "Traceback" not in err and "stopped by signal" not in out + err


def test_a_second_run_on_a_folder_in_use_is_refused_with_one_line(tmp_path, cache):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):  # this test process plays the first run
        proc = run(train_args(run_dir, cache, "train.steps=2"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"vlp train: error: output_dir {run_dir} is in use by pid {os.getpid()} on host "
        f"{socket.gethostname()} (lock file {run_dir / '.lock'}); wait for that run to end or "
        "stop it, or choose another output_dir"]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing else touched


def test_a_run_folder_whose_metrics_end_in_a_torn_line_resumes_and_repairs_it(tmp_path, cache,
                                                                              four_steps):
    run_dir = copy_of(four_steps, tmp_path)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 4.1, "lo')  # the disk filled up mid-line

    second = run(train_args(run_dir, cache, "train.steps=5", "checkpoint.every=5"))

    assert second.returncode == 0, second.stderr[-3000:]
    assert "removed a torn last line" in second.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]  # every line parses again
    # a step's training and end-of-run eval metrics are separate records of that step
    assert steps == sorted(steps) and sorted(set(steps)) == [1, 2, 3, 4, 5]
    assert (run_dir / "loss_curve.png").stat().st_size > 1000


def weights_finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


def test_a_diverging_run_falls_back_to_the_last_good_checkpoint(tmp_path, cache, four_steps):
    run_dir = copy_of(four_steps, tmp_path)

    # resumed at a learning rate of 1e6: step 5 is finite and applied (and saved, its weights
    # are finite), and its ruined weights make every later step non-finite
    diverged = run(train_args(run_dir, cache, "train.steps=40", "optim.lr=1e6",
                              "checkpoint.every=1", "checkpoint.keep_last=2",
                              "train.max_nonfinite_steps=3"))

    assert diverged.returncode == 1, diverged.stderr[-3000:]
    out = diverged.stdout + diverged.stderr
    assert "not saving the checkpoint of step 6: the last step was not finite" in out
    (error,) = [line for line in diverged.stderr.splitlines() if "vlp train: error" in line]
    assert error.startswith(
        "vlp train: error: 3 consecutive steps had a non-finite loss or gradient (steps 6-8); "
        f"nothing saved from them, the last good checkpoint is {run_dir / 'step-000000004'} (step-000000005."
        "nonfinite: its weights gave step 6).")
    assert "Traceback" not in diverged.stderr
    assert latest_checkpoint(run_dir) == run_dir / "step-000000004"
    assert (run_dir / "step-000000005.nonfinite").is_dir()  # set aside, not resumed from
    assert all(weights_finite(c) for c in list_checkpoints(run_dir))

    # resumed from it with a sane learning rate, the run trains on (a fresh streak)
    again = run(train_args(run_dir, cache, "train.steps=6", "optim.lr=1e-4",
                           "train.max_nonfinite_steps=1", "checkpoint.every=1"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir / 'step-000000004'} at step 4" in again.stdout + again.stderr
    assert latest_checkpoint(run_dir) == run_dir / "step-000000006"
    assert weights_finite(run_dir / "step-000000006")


def test_a_resumed_run_applies_the_optim_settings_its_config_records(tmp_path, cache,
                                                                     four_steps):
    run_dir = copy_of(four_steps, tmp_path)

    second = run(train_args(run_dir, cache, "train.steps=7", "checkpoint.every=7",
                            "optim.lr=1e-5", "optim.weight_decay=0.05"))

    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert ("resume: optim settings differ from the checkpoint's; using this run's: "
            "lr 0.002 -> 1e-05, weight_decay 0.1 -> 0.05") in out
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]
    assert (recorded["lr"], recorded["weight_decay"]) == (1e-5, 0.05)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl")}
    for step in (5, 6, 7):  # after step s the scheduler holds the lr of the next step
        assert lrs[step] == pytest.approx(
            1e-5 * warmup_cosine(step, warmup_steps=5, total_steps=7), abs=1e-12)
    state = json.loads((run_dir / "step-000000007" / "trainer_state.json").read_text())
    assert state["scheduler"]["base_lrs"] == [1e-5, 1e-5]
    decay_group = state["optimizer"]["param_groups"][1]
    assert decay_group["weight_decay"] == 0.05 and decay_group["initial_lr"] == 1e-5
