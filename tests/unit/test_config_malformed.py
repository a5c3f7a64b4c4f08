"""Malformed configs through `vlp train`: each fails before the run starts, with exit status 2
and one line on stderr naming the key (or file, or override) to fix."""

from pathlib import Path

import pytest

import vlp.train.loop
from vlp import cli
from vlp.config import ConfigError, load_config

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "shapesworld-tiny.yaml")


@pytest.fixture(autouse=True)
def training_must_not_start(monkeypatch):
    def refuse(cfg):
        raise AssertionError("a malformed config reached the training loop")

    monkeypatch.setattr(vlp.train.loop, "train", refuse)


def run_train(capsys, *argv: str) -> tuple[int, list[str]]:
    status = cli.main(["train", *argv])
    return status, capsys.readouterr().err.splitlines()


# Once tracebacks: (override, what the error line must name)
CRASHED = [
    ("optim.lr=nan", "optim.lr"),
    ("optim.beta1=2.0", "optim.beta1"),
    ("optim.beta2=-0.5", "optim.beta2"),
    ("optim.eps=-1", "optim.eps"),
    ("train.seed=-1", "train.seed"),
    ("train.seed=1e23", "train.seed"),
    ("train.seed=100000000000000000000000", "train.seed"),
    ("train.seed=4294967296", "train.seed"),
    ("train.trackers=[bogus]", "train.trackers[0]"),
    ("train.steps=!!python/object/apply:os.system [echo hi]", "override 'train.steps="),
    ("train.steps=[1", "override 'train.steps=[1'"),
    ("optim.lr={a: [}", "override 'optim.lr="),
]
# Once trained on nonsense
NONSENSE = [
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=-.inf", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("objectives=[{name: clip, weight: .nan}]", "objectives[0].weight"),
    ("objectives=[{name: clip, weight: -1}]", "objectives[0].weight"),
    ("objectives=[{name: clip, weight: 0}]", "objectives"),
    ("optim.grad_clip=.nan", "optim.grad_clip"),
    ("optim.warmup_steps=1e21", "optim.warmup_steps"),
    ("optim.warmup_steps=1000000000000000000000", "optim.warmup_steps"),
    ("train.steps=1e30", "train.steps"),
    ("train.steps=1000000000000000000000000000000", "train.steps"),
    ("model=null", "model"),
    ("model.init_logit_scale=.nan", "model.init_logit_scale"),
    ("data.batch_size=100000000000000000000", "data.batch_size"),
]


@pytest.mark.parametrize("override, key", CRASHED + NONSENSE)
def test_malformed_override_fails_with_one_line_naming_the_key(capsys, override, key):
    status, err = run_train(capsys, RECIPE, override)
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith("vlp train: error: ")
    assert key in err[0]


@pytest.mark.parametrize("key", ["output_dir", "data.cache_dir"])
def test_a_folder_naming_a_file_fails_with_one_line(capsys, tmp_path, key):
    (tmp_path / "taken").write_text("a file")
    for folder in (tmp_path / "taken", tmp_path / "taken" / "run"):
        status, err = run_train(capsys, RECIPE, f"{key}={folder}")
        assert status == 2 and len(err) == 1, err
        assert f"{key}: {folder}" in err[0] and "a file, not a folder" in err[0]


def test_non_utf8_recipe_fails_with_one_line_naming_the_file(capsys, tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("output_dir: runs/caf\xe9\ndata: {synth: {}}\n".encode("latin-1"))
    status, err = run_train(capsys, str(recipe))
    assert status == 2 and len(err) == 1, err
    assert str(recipe) in err[0] and "not UTF-8" in err[0]


@pytest.mark.parametrize("text", [
    "data: {synth: {}}\ntrain: {steps: !!python/object/apply:os.system [echo hi]}\n",
    "data: {synth: {}}\ntrain: [steps: 3\n",
])
def test_yaml_tags_and_invalid_yaml_in_a_recipe_fail_with_one_line(capsys, tmp_path, text):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    status, err = run_train(capsys, str(recipe))
    assert status == 2 and len(err) == 1, err
    assert f"{recipe}: not valid YAML: line " in err[0]


def test_tracker_whose_package_is_missing_is_an_error_naming_it(capsys, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    status, err = run_train(capsys, RECIPE, "train.trackers=[jsonl, wandb]")
    assert status == 2 and len(err) == 1, err
    assert "train.trackers[1]" in err[0] and "pip install wandb" in err[0]


def test_jsonl_and_installed_trackers_are_accepted(monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    cfg = load_config(RECIPE, ["train.trackers=[jsonl, tensorboard]"])
    assert cfg.train.trackers == ["jsonl", "tensorboard"]


def test_a_data_source_on_the_command_line_replaces_the_recipes(tmp_path):
    shard = tmp_path / "train-0.tar"
    shard.write_bytes(b"")
    cfg = load_config(RECIPE, [f"data.shards={shard}"])
    assert cfg.data.shards == str(shard) and cfg.data.synth is None
    cfg = load_config(RECIPE, [f"data.hf.path={tmp_path}"])
    assert cfg.data.hf.path == str(tmp_path) and cfg.data.synth is None
    assert load_config(RECIPE, ["data.synth.num_train=64"]).data.synth.num_train == 64


def test_a_folder_as_data_shards_is_named(capsys, tmp_path):
    status, err = run_train(capsys, RECIPE, f"data.shards={tmp_path}")
    assert status == 2 and len(err) == 1, err
    assert f"data.shards: {tmp_path} is a folder, not a shard" in err[0]


def test_two_data_sources_on_the_command_line_are_still_an_error(tmp_path):
    shard = tmp_path / "train-0.tar"
    shard.write_bytes(b"")
    with pytest.raises(ConfigError, match="exactly one of data.shards"):
        load_config(RECIPE, [f"data.shards={shard}", "data.synth.num_train=64"])


def test_replaced_shards_drop_the_recipes_shard_weights(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.tar").write_bytes(b"")
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"data: {{shards: '{tmp_path}/a.tar::{tmp_path}/b.tar', "
                      "shard_weights: [3, 1]}\n")
    cfg = load_config(recipe, [f"data.shards={tmp_path}/c.tar"])
    assert cfg.data.shards == f"{tmp_path}/c.tar" and cfg.data.shard_weights is None
    cfg = load_config(recipe, [f"data.shards={tmp_path}/a.tar::{tmp_path}/c.tar",
                               "data.shard_weights=[1, 2]"])
    assert cfg.data.shard_weights == [1.0, 2.0]


@pytest.mark.parametrize("error, status", [
    ("vlp.train.loop:NonFiniteLossError", 1),
    ("vlp.checkpoint:CheckpointError", 2),
    ("vlp.config:ConfigError", 2),  # e.g. checkpoint.resume names one that does not verify
])
def test_a_run_that_fails_after_start_up_ends_in_one_line(capsys, monkeypatch, error, status):
    import importlib

    module, name = error.split(":")
    cls = getattr(importlib.import_module(module), name)

    def fail(cfg):
        raise cls("what went wrong,\nover two lines")

    monkeypatch.setattr(vlp.train.loop, "train", fail)
    code, err = run_train(capsys, RECIPE)
    assert code == status
    assert err == ["vlp train: error: what went wrong, over two lines"]


def test_a_data_error_from_a_dataloader_worker_keeps_only_its_message():
    from vlp.data.pipeline import DataError

    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most "
               "recent call last):\n  File \"x.py\", line 1, in f\n    raise DataError(...)\n"
               "vlp.data.pipeline.DataError: data: stream 0 got no usable sample\n")
    assert str(DataError(wrapped)) == "data: stream 0 got no usable sample"
    assert str(DataError("plain")) == "plain"
