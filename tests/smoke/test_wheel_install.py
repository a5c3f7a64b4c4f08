"""A wheel, as `pip install .` makes it, installed into a fresh virtual environment, runs the main
job and the default eval suite from a folder outside the repository.

The new environment reuses this one's installed dependencies (a `.pth` line naming its
site-packages, which puts the folder on sys.path without running the `.pth` files there, so an
editable vlp stays out) instead of installing torch again; vlp itself comes only from the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"vlp": "vlp", "data_tools": "data_tools", "eval": "vlp/resources/eval",
           "recipes": "vlp/resources/recipes"}
"""Source folder → where its files sit in the wheel."""
SYNTH = ["data.synth.num_train=600", "data.synth.num_eval=64", "data.synth.samples_per_shard=300"]

pytestmark = pytest.mark.slow


def run(cmd: list[str], *, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME",
                                                            "VIRTUAL_ENV")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def source_files() -> set[str]:
    """Every file the wheel must carry, by its path inside the wheel."""
    files = set()
    for folder, inside in SHIPPED.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files.add(f"{inside}/{path.relative_to(ROOT / folder).as_posix()}")
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # build from a copy, so that build/ and *.egg-info never land in the checkout
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", *SHIPPED):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)],
        cwd=dist)
    (built,) = dist.glob("vlp-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--clear", str(env_dir)], cwd=env_dir)
    python = env_dir / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=env_dir).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_outer_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)], cwd=env_dir)
    return env_dir


def test_the_wheel_carries_every_module_suite_template_reference_and_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert source_files() - names == set()
    assert "vlp/resources/eval/suites/shapesworld.yaml" in names


def test_vlp_in_the_new_environment_is_the_installed_wheel(venv, tmp_path):
    code = "import vlp, vlp.resources as r; print(vlp.__file__); print(r.eval_dir()); print(r.recipes())"
    out = run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path).stdout.splitlines()
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert all(line.startswith(str(site)) for line in out[:2]), out
    assert out[1].endswith("site-packages/vlp/resources/eval")
    assert "'shapesworld-tiny'" in out[2]
    version = run([str(venv / "bin" / "vlp"), "--version"], cwd=tmp_path).stdout.strip()
    assert version.startswith("vlp ")


def test_the_main_job_and_the_default_eval_suite_run_outside_the_repository(venv, tmp_path):
    vlp = str(venv / "bin" / "vlp")
    cache = tmp_path / "cache"
    run([vlp, "train", "shapesworld-tiny", "output_dir=runs/tiny", f"data.cache_dir={cache}",
         *SYNTH, "data.batch_size=32", "data.num_workers=0", "data.shuffle_buffer=100",
         "train.steps=4", "train.log_every=2", "train.trackers=[jsonl]", "checkpoint.every=4",
         "optim.warmup_steps=1", "eval.batch_size=64"], cwd=tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "step-000000004" / "model.safetensors").is_file()
    final_eval = run_dir / "eval" / "step-000000004"  # the end-of-run suite's files
    assert "acc1" in json.loads((final_eval / "zeroshot.json").read_text())["metrics"]

    suite = [f"shapesworld.cache_dir={cache}", "shapesworld.params.num_train=600",
             "shapesworld.params.num_eval=64", "shapesworld.params.samples_per_shard=300"]
    proc = run([vlp, "eval", "--checkpoint", "runs/tiny", "--out", "eval-out", "--quiet",
                *suite], cwd=tmp_path)
    results = json.loads((tmp_path / "eval-out" / "results.json").read_text())
    assert results["suite"] == "shapesworld"
    assert {"zeroshot", "retrieval", "sugarcrepe", "aro", "order", "gap"} <= set(
        results["benchmarks"])
    assert all(bench["metrics"] for bench in results["benchmarks"].values())
    assert results["suite_file"].endswith("site-packages/vlp/resources/eval/suites/shapesworld.yaml")
    assert "report: eval-out/report.md" in proc.stdout
