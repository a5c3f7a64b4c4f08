"""Several true captions per sample (`data.captions`): the txt caption only, one drawn per
read, or all of them as positives; malformed json `captions` skip the sample."""

import json
import random
from itertools import islice

import pytest
import torch

from tests.unit.test_pipeline import good, raw, write_shard
from vlp.config import ConfigError, DataConfig, HFDataConfig
from vlp.data.captions import CAPTION_MODES, choose_positives, extra_captions
from vlp.data.limits import SampleLimits
from vlp.data.pipeline import build_train_loader, decode_sample
from vlp.models import build_model


@pytest.fixture(scope="module")
def bundle():
    return build_model("vlp-tiny")


def with_captions(i, captions):
    return {**good(i), "json": json.dumps({"captions": captions})}


def decode(bundle, sample, **kwargs):
    return decode_sample(raw(sample), bundle.preprocess_val, bundle.tokenizer, **kwargs)


def tokens(bundle, *texts):
    return bundle.tokenizer(list(texts))


def test_first_is_the_txt_caption_and_does_not_read_captions(bundle):
    sample = {**good(1), "json": json.dumps({"captions": 7})}  # malformed, but not read
    out = decode(bundle, sample, rng=random.Random(0))
    assert torch.equal(out["text"], tokens(bundle, "sample 1")[0])
    assert "pos_text" not in out


def test_sample_draws_every_caption_uniformly_with_the_given_rng(bundle):
    sample = with_captions(1, ["a red circle", "a circle that is red"])
    rng = random.Random(0)
    drawn = [choose_positives("sample", "sample 1", raw(sample), rng=rng)["text"]
             for _ in range(3000)]
    counts = {text: drawn.count(text) for text in set(drawn)}
    assert set(counts) == {"sample 1", "a red circle", "a circle that is red"}
    assert all(900 < n < 1100 for n in counts.values()), counts
    again = [choose_positives("sample", "sample 1", raw(sample), rng=random.Random(0))["text"]
             for _ in range(2)]
    assert again[0] == again[1] == drawn[0]  # the same seed, the same draw


def test_all_puts_txt_first_and_pads_by_repeating_with_a_mask(bundle):
    out = decode(bundle, with_captions(2, ["x one", "x two"]), captions="all",
                 num_positives=5, rng=random.Random(0))
    expected = tokens(bundle, "sample 2", "x one", "x two", "sample 2", "x one")
    assert torch.equal(out["pos_text"], expected)
    assert out["pos_mask"].tolist() == [True, True, True, False, False]
    assert torch.equal(out["text"], expected[0])


def test_all_draws_k_minus_one_distinct_extras_when_there_are_more():
    extras = [f"caption {j}" for j in range(6)]
    sample = raw(with_captions(3, extras))
    seen = set()
    for seed in range(20):
        chosen = choose_positives("all", "sample 3", sample, rng=random.Random(seed),
                                  num_positives=3)
        assert chosen["positives"][0] == "sample 3" and chosen["mask"] == [True] * 3
        assert len(set(chosen["positives"][1:])) == 2 and set(chosen["positives"][1:]) <= set(extras)
        seen.update(chosen["positives"][1:])
    assert seen == set(extras)


def test_a_sample_without_json_or_captions_has_only_its_txt_caption(bundle):
    for sample in (good(4), {**good(4), "json": json.dumps({"neg_captions": ["no"]})}):
        out = decode(bundle, sample, captions="all", num_positives=2, rng=random.Random(0))
        assert out["pos_mask"].tolist() == [True, False]
        assert torch.equal(out["pos_text"], tokens(bundle, "sample 4", "sample 4"))


@pytest.mark.parametrize("captions", [
    "a red circle",            # not a list
    ["a red circle", 3],       # not all strings
    ["a red circle", "   "],   # an empty string
    {"0": "a red circle"},
])
@pytest.mark.parametrize("mode", ["sample", "all"])
def test_malformed_captions_raise_naming_the_field(bundle, captions, mode):
    with pytest.raises(ValueError, match="json 'captions' must be a list of non-empty strings"):
        decode(bundle, with_captions(5, captions), captions=mode, num_positives=2,
               rng=random.Random(0))


def test_a_caption_over_the_length_limit_is_refused():
    with pytest.raises(ValueError, match="json 'captions'.*max_caption_chars"):
        extra_captions(raw(with_captions(6, ["ok", "x" * 51])),
                       SampleLimits(max_caption_chars=50))


def test_malformed_captions_are_skipped_and_counted_in_the_stream(tmp_path, bundle):
    samples = [with_captions(i, [f"other {i}"]) for i in range(6)]
    samples[1]["json"] = json.dumps({"captions": [1, 2]})
    samples[4]["json"] = json.dumps({"captions": ""})
    write_shard(tmp_path / "a.tar", samples)
    loader = build_train_loader(
        str(tmp_path / "a.tar"), preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer,
        batch_size=4, num_workers=0, shuffle_buffer=0, seed=0, captions="all", num_positives=3)
    batch = next(iter(loader))
    assert batch["key"] == ["s00000", "s00002", "s00003", "s00005"]
    assert batch["skipped"] == 2
    assert batch["pos_text"].shape == (4, 3, 32) and batch["pos_mask"].dtype == torch.bool
    assert batch["pos_mask"].tolist() == [[True, True, False]] * 4


def test_sample_mode_draws_differ_between_reads_and_replay_from_the_seed(tmp_path, bundle):
    captions = [f"alt {j}" for j in range(7)]
    write_shard(tmp_path / "a.tar", [with_captions(0, captions), good(1)])

    def texts(seed):
        loader = build_train_loader(
            str(tmp_path / "a.tar"), preprocess=bundle.preprocess_val,
            tokenizer=bundle.tokenizer, batch_size=2, num_workers=0, shuffle_buffer=0,
            seed=seed, mode="epoch", captions="sample")
        return [tuple(b["text"][b["key"].index("s00000")].tolist())
                for b in islice(iter(loader), 12)]

    first = texts(0)
    assert len(set(first)) > 2  # a new draw each epoch, not one fixed rewrite
    assert texts(0) == first


@pytest.mark.parametrize("fields, message", [
    ({"captions": "some"}, "data.captions must be one of first, sample, all"),
    ({"captions": "all"}, "needs data.num_positives >= 1"),
    ({"captions": "sample", "num_positives": 3}, "used with data.captions: all only"),
    ({"captions": "sample", "hf": HFDataConfig(path="/data/pairs")},
     "a Hugging Face dataset .* has none"),
])
def test_data_config_validates_captions(fields, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**fields)


def test_every_caption_mode_is_accepted_by_the_config():
    for mode in CAPTION_MODES:
        assert DataConfig(captions=mode, num_positives=2 if mode == "all" else 0).captions == mode
    assert DataConfig().captions == "first"




def test_the_main_recipe_reads_txt_only_unless_told_and_takes_sample_with_clip():
    from pathlib import Path

    from vlp.train.checks import load_run_config

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "shapesworld-tiny.yaml"
    assert load_run_config(recipe).data.captions == "first"
    assert load_run_config(recipe, ["data.captions=sample"]).data.captions == "sample"
