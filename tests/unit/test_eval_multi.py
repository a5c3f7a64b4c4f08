"""`vlp eval` on several checkpoints in one process (vlp.eval.multi through vlp.cli.main): every
checkpoint gets its own subfolder, written as soon as it is done, under a summary of headline
metrics; `--all-steps` stands for a run's checkpoints in step order; the images decoded for the
first checkpoint are not decoded again for the others; a checkpoint that does not load is named
in one line. Random vlp-tiny checkpoints, zero-shot on eight 16 px images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.transforms import Compose

import vlp.eval.multi
import vlp.eval.zeroshot
from tests.checkpoints import write_random_checkpoint
from vlp.checkpoint import write_manifest
from vlp.cli import main
from vlp.eval.benchmark_data import write_benchmark
from vlp.eval.loading import load_model
from vlp.eval.multi import folder_names
from vlp.models import default_preprocess_cfg, model_config, text_spec

STEPS = [50, 100, 200]
IMAGES = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder with three checkpoints, written out of step order, a `latest` pointer and an
    unfinished `.tmp` checkpoint that is not one of them."""
    run = tmp_path_factory.mktemp("run")
    for seed, step in enumerate([200, 50, 100]):
        write_random_checkpoint(run / f"step-{step:09d}", seed=seed)
    (run / "latest").write_text("step-000000200\n")
    shutil.copytree(run / "step-000000200", run / "step-000000300.tmp")
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    colours = [(30 * i, 250 - 30 * i, 90) for i in range(IMAGES)]
    return write_benchmark(
        tmp_path_factory.mktemp("zeroshot"),
        [(Image.new("RGB", (16, 16), c), i % 3) for i, c in enumerate(colours)],
        classnames=["circle", "square", "star"], templates=["a {c}", "a photo of a {c}"])


def eval_args(data: Path, out: Path, *checkpoints: str | Path) -> list[str]:
    return ["eval", "--checkpoint", *map(str, checkpoints), "--task", "zeroshot", "--data",
            str(data), "--out", str(out), "--device", "cpu"]


@pytest.fixture(scope="module")
def all_steps(run, data, tmp_path_factory):
    """`vlp eval --checkpoint RUN --all-steps`, counting the images each checkpoint's suite run
    decodes (calls of the torchvision transform) and the transform object it was given."""
    out = tmp_path_factory.mktemp("out") / "steps"
    decoded, transforms = [], []
    evaluate_suite = vlp.eval.multi.evaluate_suite
    calls = 0

    def counting_call(self, image):
        nonlocal calls
        calls += 1
        return original_call(self, image)

    def counting_suite(model, tokenizer, preprocess, *args, **kwargs):
        before = calls
        result = evaluate_suite(model, tokenizer, preprocess, *args, **kwargs)
        decoded.append(calls - before)
        transforms.append(preprocess)
        return result

    original_call = Compose.__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Compose, "__call__", counting_call)
        patch.setattr(vlp.eval.multi, "evaluate_suite", counting_suite)
        code = main([*eval_args(data, out, run), "--all-steps"])
    return {"code": code, "out": out, "decoded": decoded, "transforms": transforms}


def test_all_steps_evaluates_every_checkpoint_of_the_run_in_step_order(all_steps, run):
    out = all_steps["out"]
    summary = json.loads((out / "results.json").read_text())

    assert all_steps["code"] == 0
    names = [f"step-{step:09d}" for step in STEPS]
    assert [row["name"] for row in summary["checkpoints"]] == names
    assert [row["step"] for row in summary["checkpoints"]] == STEPS
    assert [row["checkpoint"] for row in summary["checkpoints"]] == [str(run / n) for n in names]
    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.md", "results.json", *names]
    for name, step in zip(names, STEPS, strict=True):
        own = json.loads((out / name / "results.json").read_text())
        assert own["model"] == str(run / name) and own["step"] == step
        assert (out / name / "zeroshot.json").is_file() and (out / name / "report.md").is_file()


def test_summary_rows_are_each_checkpoints_result_alone(all_steps, run, data, tmp_path, capsys):
    out = all_steps["out"]
    rows = json.loads((out / "results.json").read_text())["checkpoints"]

    code = main(eval_args(data, tmp_path, run / "step-000000100"))

    assert code == 0
    alone = json.loads((tmp_path / "results.json").read_text())["benchmarks"]["zeroshot"]
    assert not any(p.is_dir() and p.name.startswith("step-") for p in tmp_path.iterdir())
    together = json.loads((out / "step-000000100" / "results.json").read_text())
    assert together["benchmarks"]["zeroshot"]["metrics"] == pytest.approx(alone["metrics"])
    assert rows[1]["metrics"] == {"zeroshot": pytest.approx(alone["metrics"]["acc1"])}
    # three random models: their headline numbers are not all the same number
    assert len({row["metrics"]["zeroshot"] for row in rows}) > 1


def test_later_checkpoints_decode_no_image(all_steps):
    assert all_steps["decoded"] == [IMAGES, 0, 0]
    first = all_steps["transforms"][0]
    assert all(t is first for t in all_steps["transforms"])


def test_summary_report_table_and_steps_plot(all_steps):
    out = all_steps["out"]
    report = (out / "report.md").read_text()

    assert "| checkpoint | step | zeroshot acc1 |" in report
    for step in STEPS:
        assert f"| [step-{step:09d}](step-{step:09d}/report.md) | {step} | 0." in report
    assert "![headline metrics against the training step](plots/steps.png)" in report
    assert (out / "plots" / "steps.png").stat().st_size > 1000


def test_progress_says_which_checkpoint_and_the_end_says_where_the_summary_is(
        run, data, tmp_path, capsys):
    code = main(eval_args(data, tmp_path, run / "step-000000050", run / "step-000000100"))

    printed = capsys.readouterr().out
    assert code == 0
    assert f"[vlp eval] checkpoint 1 of 2: {run / 'step-000000050'}" in printed
    assert f"[vlp eval] checkpoint 2 of 2: {run / 'step-000000100'}" in printed
    assert f"report: {tmp_path / 'report.md'}" in printed
    assert f"results: {tmp_path / 'results.json'}" in printed


def test_checkpoints_with_the_same_text_tower_encode_each_caption_once(run, data, tmp_path,
                                                                      monkeypatch):
    """Two steps of a LiT run: the image tower moved, the locked text tower did not."""
    lit = tmp_path / "lit"
    shutil.copytree(run / "step-000000050", lit / "step-000000050")
    shutil.copytree(run / "step-000000050", lit / "step-000000100")
    weights = lit / "step-000000100" / "model.safetensors"
    moved = {k: v + 0.1 if k.startswith("visual.") else v for k, v in load_file(weights).items()}
    save_file(moved, weights)
    write_manifest(lit / "step-000000100", step=100, milestone=False)
    encoded, encode = [], vlp.eval.zeroshot._encode_texts

    def counting(model, tokenizer, texts, device):
        encoded.append(len(texts))
        return encode(model, tokenizer, texts, device)

    monkeypatch.setattr(vlp.eval.zeroshot, "_encode_texts", counting)
    code = main([*eval_args(data, tmp_path / "out", lit), "--all-steps", "--quiet"])

    assert code == 0
    assert sum(encoded) == 3 * 2  # three classes, two templates: the first checkpoint only
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["checkpoints"]
    encoded.clear()
    assert main(eval_args(data, tmp_path / "alone", lit / "step-000000100")) == 0
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())
    assert sum(encoded) == 3 * 2
    assert rows[1]["metrics"]["zeroshot"] == pytest.approx(
        alone["benchmarks"]["zeroshot"]["metrics"]["acc1"])


@pytest.mark.parametrize("extra", [[], ["--all-steps"]])
def test_a_missing_checkpoint_fails_before_anything_runs_naming_it(
        run, data, tmp_path, capsys, extra):
    missing = tmp_path / "no-such-run"

    code = main([*eval_args(data, tmp_path / "out", run / "step-000000050", missing), *extra])

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vlp eval: error:") and err.count("\n") == 1
    assert str(missing) in err
    assert not (tmp_path / "out").exists()


def test_a_folder_with_no_checkpoint_fails_with_all_steps_naming_it(data, tmp_path, capsys):
    empty = tmp_path / "empty-run"
    empty.mkdir()

    code = main([*eval_args(data, tmp_path / "out", empty), "--all-steps"])

    err = capsys.readouterr().err
    assert code == 2 and f"--all-steps: {empty} holds no step-N checkpoint" in err


def test_a_checkpoint_that_does_not_load_is_named_and_the_others_still_run(
        run, data, tmp_path, capsys):
    broken = tmp_path / "broken" / "step-000000100"
    shutil.copytree(run / "step-000000100", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"

    code = main([*eval_args(data, out, broken, run / "step-000000200"), "--quiet"])

    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("vlp eval: error: checkpoint 1 of 2 "
                                                   f"({broken}) did not load:")
    rows = json.loads((out / "results.json").read_text())["checkpoints"]
    assert "model.safetensors" in rows[0]["error"] and rows[0]["metrics"] == {}
    assert rows[1]["error"] is None and (out / rows[1]["name"] / "results.json").is_file()
    assert not (out / rows[0]["name"]).exists()


def test_folder_names_are_the_checkpoints_names_disambiguated():
    assert folder_names(["runs/a/step-000000100", "runs/a/step-000000200"]) == [
        "step-000000100", "step-000000200"]
    assert folder_names(["runs/a/step-000000100", "runs/b/step-000000100", "open_clip:ViT-B-32:x"]
                        ) == ["a-step-000000100", "b-step-000000100", "ViT-B-32"]
    assert folder_names(["runs/a/step-000000100", "runs/a/step-000000100"]) == [
        "a-step-000000100", "a-step-000000100-2"]


def test_only_checkpoints_with_the_same_preprocessing_share_a_transform(run, tmp_path):
    other = tmp_path / "step-000000050"
    shutil.copytree(run / "step-000000050", other)
    image = default_preprocess_cfg(model_config("vlp-tiny"))
    (other / "preprocess.json").write_text(json.dumps({
        "image": {**image, "mean": [0.5, 0.5, 0.5]}, "text": text_spec("vlp-tiny",
                                                                       model_config("vlp-tiny"))}))
    write_manifest(other, step=50, milestone=False)

    first, second, changed = (load_model(str(path)) for path in (
        run / "step-000000050", run / "step-000000100", other))

    assert first.preprocess_key == second.preprocess_key != changed.preprocess_key
    assert first.tokenizer_key == second.tokenizer_key == changed.tokenizer_key
