"""The data section of a recipe: modes, mixture weights, a Hugging Face source."""

import pytest
import yaml

from vlp.config import ConfigError, load_config


def recipe(tmp_path, data: dict):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(b"")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def test_mixture_weights_and_modes_load(tmp_path):
    spec = f"{tmp_path}/a.tar::{tmp_path}/b.tar"
    cfg = load_config(recipe(tmp_path, {"shards": spec, "shard_weights": [3, 1]}))
    assert cfg.data.mode == "resampled" and cfg.data.shard_weights == [3.0, 1.0]
    assert load_config(recipe(tmp_path, {"shards": spec, "mode": "epoch"})).data.mode == "epoch"


@pytest.mark.parametrize("data, message", [
    ({"mode": "sequential"}, "data.mode must be one of resampled, epoch, got 'sequential'"),
    ({"shard_weights": [1]}, r"data.shard_weights: 1 weights for 2 '::'-separated parts"),
    ({"shard_weights": [1, 1], "mode": "epoch"}, "data.shard_weights needs data.mode: resampled"),
    ({"shard_weights": [0, 0]}, "data.shard_weights must be >= 0 and not all 0"),
])
def test_bad_data_settings_are_named(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(recipe(tmp_path, {"shards": f"{tmp_path}/a.tar::{tmp_path}/b.tar", **data}))


def test_hf_source_is_one_of_the_three_and_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="data.hf.path: no such folder"):
        load_config(recipe(tmp_path, {"hf": {"path": str(tmp_path / "nowhere")}}))
    with pytest.raises(ConfigError, match="exactly one of data.shards"):
        load_config(recipe(tmp_path, {"hf": {"path": str(tmp_path)},
                                      "shards": f"{tmp_path}/a.tar"}))
    cfg = load_config(recipe(tmp_path, {"hf": {"path": str(tmp_path), "text_column": "caption"}}))
    assert cfg.data.hf.text_column == "caption" and cfg.data.hf.split == "train"
