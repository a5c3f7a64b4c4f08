"""Rule-based caption rewrites (`vlp shards rewrites`): other true captions of the image."""

import json

import webdataset as wds

from tests.unit.streaming_helpers import png_bytes, preprocess, tokenizer
from vlp.cli import main
from vlp.data.pipeline import build_train_loader
from vlp.data.rewrites import KINDS, rewrites
from vlp.data.shapesworld import describes, make_train_sample, parse_caption
from vlp.data.shards_build import add_rewrites


def by_kind(caption: str, **kwargs) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for text, kind in rewrites(caption, num=10, **kwargs):
        out.setdefault(kind, set()).add(text)
    return out


def test_each_rule_on_a_caption_it_applies_to():
    assert by_kind("A small red car on top of a wooden table.") == {
        "drop_att": {"A red car on top of a wooden table.", "A small car on top of a wooden table.",
                     "A small red car on top of a table."},
        "invert_rel": {"A wooden table under a small red car."},
    }
    assert by_kind("a cat and a dog") == {"swap_and": {"a dog and a cat"}}
    assert by_kind("an old man left of a tree")["drop_att"] == {"a man left of a tree"}


def test_captions_the_rules_do_not_apply_to_get_no_rewrite():
    for caption in ("a dog runs on the grass", "sunset over water", "one", ""):
        assert rewrites(caption, num=3) == []


def test_rewrites_are_distinct_never_the_caption_and_at_most_num():
    for caption in ("the big black dog and the small white cat near a red house",
                    "A B C", "a a a", "the red red ball"):
        pairs = rewrites(caption, num=2, seed=3)
        texts = [t for t, _ in pairs]
        assert len(pairs) <= 2 and len(set(texts)) == len(texts)
        assert all(kind in KINDS for _, kind in pairs)
        assert " ".join(caption.lower().split()) not in [t.lower() for t in texts]


def test_every_shapesworld_rewrite_its_grammar_reads_is_true_of_the_scene():
    """ShapesWorld knows the truth: a rewrite of a true caption that parses describes the scene
    (leaving out a colour makes captions its grammar does not read, so those are not judged)."""
    judged = 0
    for index in range(300):
        sample = make_train_sample(index, seed=0)
        for text, _ in rewrites(sample.caption, num=5):
            if parse_caption(text) is not None:
                judged += 1
                assert describes(sample.scene, text), (sample.caption, text)
    assert judged > 100


def write_input(path):
    captions = ["a small red car on top of a wooden table", "sunset over water",
                "a cat and a dog"]
    with wds.TarWriter(str(path)) as sink:
        for i, caption in enumerate(captions):
            sink.write({"__key__": f"k{i}", "png": png_bytes(i), "txt": caption,
                        "json": json.dumps({"source": f"s{i}"})})


def test_shards_rewrites_writes_captions_that_training_reads(tmp_path):
    write_input(tmp_path / "in.tar")
    totals = add_rewrites(str(tmp_path / "in.tar"), tmp_path / "out", num=2, workers=1,
                          progress=False)
    assert totals == {"shards": 1, "samples": 3, "with_rewrites": 2, "rewrites": 3}
    samples = list(wds.WebDataset(str(tmp_path / "out" / "in.tar"), shardshuffle=False,
                                  empty_check=False))
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["source"] for m in metas] == ["s0", "s1", "s2"]  # what was there stays
    assert [len(m["captions"]) for m in metas] == [2, 0, 1]
    assert metas[2]["captions"] == ["a dog and a cat"] and metas[2]["caption_kinds"] == ["swap_and"]
    loader = build_train_loader(str(tmp_path / "out" / "in.tar"), preprocess=preprocess,
                                tokenizer=tokenizer, batch_size=3, num_workers=0, mode="epoch",
                                captions="all", num_positives=3)
    batch = next(iter(loader))
    assert batch["skipped"] == 0
    assert batch["pos_mask"].sum(1).tolist() == [3, 1, 2]


def test_rewrites_command(tmp_path, capsys):
    write_input(tmp_path / "in.tar")
    assert main(["shards", "rewrites", "--shards", str(tmp_path / "in.tar"), "--out",
                 str(tmp_path / "out"), "--num", "1", "--quiet"]) == 0
    assert "2 rewrites for 2 of 3 samples in 1 shards" in capsys.readouterr().out


def test_validate_with_captions_reports_a_malformed_captions_field(tmp_path):
    from vlp.data.shard_inspect import validate_shards

    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "good", "png": png_bytes(1), "txt": "a cat",
                    "json": json.dumps({"captions": ["a small cat"]})})
        sink.write({"__key__": "bad", "png": png_bytes(2), "txt": "a dog",
                    "json": json.dumps({"captions": "a small dog"})})
    assert validate_shards(str(tmp_path / "a.tar"))["num_corrupt"] == 0  # not read by default
    report = validate_shards(str(tmp_path / "a.tar"), captions=True)
    assert [(p["key"], p["reason"][:16]) for p in report["corrupt"]] == [("bad", "json 'captions' ")]
