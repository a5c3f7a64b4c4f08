"""The run config: strict loading, overrides, one clear error per mistake."""

from pathlib import Path

import pytest
import yaml

from vlp.config import ConfigError, RunConfig, dump_config, load_config
from vlp.train.checks import load_run_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def minimal(**sections) -> dict:
    return {"data": {"synth": {"num_train": 100}}, **sections}


def test_shipped_main_recipe_loads():
    cfg = load_config(RECIPES / "shapesworld-tiny.yaml")
    assert cfg.model.name == "vlp-tiny-rn"
    assert cfg.data.synth is not None and cfg.data.shards is None
    assert [o.name for o in cfg.objectives] == ["clip"]


def test_cluster_recipe_names_the_missing_shards_until_overridden(tmp_path):
    with pytest.raises(ConfigError, match="data.shards: shard not found: /path/to/your"):
        load_config(RECIPES / "clip-vit-b32.yaml")
    shard = tmp_path / "s-0.tar"
    shard.write_bytes(b"")
    cfg = load_config(RECIPES / "clip-vit-b32.yaml", [f"data.shards={shard}"])
    assert cfg.model.name == "ViT-B-32" and cfg.train.mixed_precision == "bf16"


def test_overrides_win_over_recipe(tmp_path):
    path = write(tmp_path, minimal(train={"steps": 10}))
    cfg = load_config(path, ["train.steps=200", "output_dir=runs/try1", "optim.lr=0.01"])
    assert cfg.train.steps == 200
    assert cfg.output_dir == "runs/try1"
    assert cfg.optim.lr == 0.01


def test_int_is_accepted_where_float_expected(tmp_path):
    cfg = load_config(write(tmp_path, minimal(optim={"lr": 1})))
    assert isinstance(cfg.optim.lr, float)


def test_exponent_without_dot_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, minimal()), ["optim.lr=2e-3"])
    assert cfg.optim.lr == 0.002


def test_yaml_no_means_the_string_no(tmp_path):
    (tmp_path / "r.yaml").write_text("data: {synth: {num_train: 100}}\ntrain: {mixed_precision: no}\n")
    assert load_config(tmp_path / "r.yaml").train.mixed_precision == "no"
    cfg = load_config(write(tmp_path, minimal()), ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"


def test_eval_suite_must_exist_and_every_be_non_negative(tmp_path):
    with pytest.raises(ConfigError, match="eval.suite: no such suite file nowhere.yaml"):
        load_config(write(tmp_path, minimal(eval={"suite": "nowhere.yaml"})))
    with pytest.raises(ConfigError, match="eval.every must be >= 0"):
        load_config(write(tmp_path, minimal(eval={"every": -1})))


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'"):
        load_config(write(tmp_path, minimal(train={"stpes": 3})))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(write(tmp_path, minimal(trian={"steps": 3})))


def test_unknown_override_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_config(write(tmp_path, minimal()), ["optim.learning_rate=1"])


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match="train.steps: expected int, got 'many'"):
        load_config(write(tmp_path, minimal(train={"steps": "many"})))


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size: expected int"):
        load_config(write(tmp_path, minimal()), ["data.batch_size=true"])


def test_missing_shard_path_is_named(tmp_path):
    recipe = {"data": {"shards": str(tmp_path / "train-{000..002}.tar")}}
    with pytest.raises(ConfigError, match="shard not found: .*train-000.tar"):
        load_config(write(tmp_path, recipe))


def test_data_source_must_be_exactly_one(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of data.shards"):
        load_config(write(tmp_path, {"data": {}}))


def test_unknown_objective_lists_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"objectives\[0\].name: unknown objective 'clipp'.*clip"):
        load_run_config(write(tmp_path, minimal(objectives=[{"name": "clipp"}])))


def test_unknown_objective_parameter_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'objectives\[0\].temperature'"):
        load_run_config(write(tmp_path, minimal(objectives=[{"name": "clip", "temperature": 2}])))


def test_unknown_backend_is_named(tmp_path):
    with pytest.raises(ConfigError, match="loss.backend: unknown 'rings'"):
        load_run_config(write(tmp_path, minimal(loss={"backend": "rings"})))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=0", "train.steps"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("data.batch_size=-1", "data.batch_size"),
        ("optim.lr=0", "optim.lr"),
        ("checkpoint.every=0", "checkpoint.every"),
        ("data.synth.image_size=0", "data.synth.image_size"),
        ("data.max_caption_chars=0", "data.max_caption_chars"),
        ("data.max_image_pixels=-5", "data.max_image_pixels"),
        ("checkpoint.milestones=[0]", "checkpoint.milestones"),
        ("checkpoint.milestone_every=-1", "checkpoint.milestone_every"),
    ],
)
def test_out_of_range_value_is_named(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, minimal()), [override])


def test_malformed_override_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(write(tmp_path, minimal()), ["train.steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RECIPES / "shapesworld-tiny.yaml", ["train.steps=7"])
    again = load_config(write(tmp_path, yaml.safe_load(dump_config(cfg))))
    assert again == cfg
    assert isinstance(again, RunConfig)
