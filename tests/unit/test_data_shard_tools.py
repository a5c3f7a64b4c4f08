"""`vlp shards build | negatives | inspect | validate` and the modules behind them."""

import io
import json
from itertools import islice

import datasets
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from tests.unit.streaming_helpers import png_bytes, preprocess, tokenizer
from vlp.cli import main
from vlp.data.negatives import hard_negatives, parse_rules
from vlp.data.pipeline import build_train_loader
from vlp.data.shard_inspect import inspect_shards, validate_shards
from vlp.data.shards_build import (
    add_negatives,
    folder_records,
    hf_records,
    table_records,
    write_shards,
)

CAPTIONS = [f"a photo of thing number {i}, {'big ' * (i % 3)}and round" for i in range(7)]


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    for i, caption in enumerate(CAPTIONS):
        sub = folder / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i}.png").write_bytes(png_bytes(i, size=12))
        (sub / f"img{i}.txt").write_text(caption + "\n")
    (folder / "part0" / "no_caption.png").write_bytes(png_bytes(99))  # no sidecar: not a record
    (folder / "part1" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "part1" / "broken.txt").write_text("a caption for an unreadable image")
    return folder


def shard_captions(spec: str) -> list[str]:
    return [s["txt"].decode() for s in wds.WebDataset(spec, shardshuffle=False, empty_check=False)]


def test_folder_to_shards_to_batches_keeps_every_caption(image_folder, tmp_path):
    out = tmp_path / "shards"
    stats = write_shards(folder_records(image_folder), out, samples_per_shard=3, workers=2,
                         progress=False)
    assert stats["num_samples"] == 7 and stats["num_shards"] == 3
    assert [s["samples"] for s in stats["shards"]] == [3, 2, 2]  # broken.jpg is record 4
    assert stats["num_skipped"] == 1 and "unreadable image" in stats["skipped"][0]["reason"]
    assert stats["skipped"][0]["source"] == "part1/broken.jpg"
    assert json.loads((out / "stats.json").read_text()) == stats
    assert json.loads((out / "sizes.json").read_text()) == {
        "shard-000000.tar": 3, "shard-000001.tar": 2, "shard-000002.tar": 2}
    words = [len(c.split()) for c in CAPTIONS]
    assert stats["caption_words"]["min"] == min(words) and stats["caption_words"]["max"] == max(words)
    assert stats["total_bytes"] > sum(len(c) for c in CAPTIONS)

    loader = build_train_loader(stats["spec"], preprocess=preprocess, tokenizer=tokenizer,
                                batch_size=7, num_workers=0, mode="epoch")
    (batch,) = islice(iter(loader), 1)  # one epoch
    assert sorted(batch["text"].tolist()) == sorted(tokenizer(CAPTIONS).tolist())
    assert sorted(batch["key"]) == [f"{i:09d}" for i in range(8) if i != 4]  # broken is key 4


def test_rebuilding_gives_byte_identical_shards(image_folder, tmp_path):
    for name in ("a", "b"):
        write_shards(folder_records(image_folder), tmp_path / name, samples_per_shard=4,
                     progress=False, workers=1 if name == "a" else 2)
    for shard in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_resize_shrinks_the_shorter_side(image_folder, tmp_path):
    big = image_folder / "part0" / "big.png"
    Image.new("RGB", (300, 200), "red").save(big)
    big.with_suffix(".txt").write_text("a big red picture")
    stats = write_shards(folder_records(image_folder), tmp_path / "out", samples_per_shard=100,
                         resize=50, progress=False, workers=1)
    sizes = {s["txt"].decode(): Image.open(io.BytesIO(s["jpg"])).size
             for s in wds.WebDataset(stats["spec"], shardshuffle=False, empty_check=False)}
    assert sizes["a big red picture"] == (75, 50)
    assert sizes[CAPTIONS[0]] == (12, 12)  # already small: not enlarged


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_tables_of_paths_and_captions(image_folder, tmp_path, fmt):
    rows = pd.DataFrame({"filepath": [f"images/part{i % 2}/img{i}.png" for i in range(7)],
                         "title": CAPTIONS})
    table = tmp_path / f"pairs.{fmt}"
    if fmt == "parquet":
        rows.to_parquet(table)
    else:
        rows.to_csv(table, sep="\t" if fmt == "tsv" else ",", index=False)
    stats = write_shards(table_records(table), tmp_path / "out", samples_per_shard=5,
                         progress=False, workers=1)
    assert stats["num_samples"] == 7
    assert sorted(shard_captions(stats["spec"])) == sorted(CAPTIONS)
    with pytest.raises(ValueError, match="no text column 'caption'"):
        table_records(table, text_column="caption")


def test_hf_dataset_to_shards(tmp_path):
    rows = {"img": [Image.new("RGB", (5, 5), (i, 9, 9)) for i in range(5)],
            "sentence": CAPTIONS[:5]}
    features = datasets.Features({"img": datasets.Image(), "sentence": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    records = hf_records(str(tmp_path / "hf"), split=None, image_column="img",
                         text_column="sentence")
    stats = write_shards(records, tmp_path / "out", samples_per_shard=2, progress=False,
                         workers=2)  # each writer process reads its rows' images itself
    assert stats["num_samples"] == 5 and shard_captions(stats["spec"]) == CAPTIONS[:5]


TRICKY = [
    "A red car parked next to a small white dog.", "two men riding horses on the beach",
    "a dog next to a dog", "the red red ball", "a cat on a mat", "A B C", "sunset over water",
    "a white plate with a white cup on a white table", "the big black dog is under the table",
    "one", "a a a", "the man holding the man", "3 green apples in a green bowl",
]


def test_negatives_are_never_the_caption_and_say_their_kind():
    kinds = set()
    for caption in TRICKY:
        pairs = hard_negatives(caption, num=5, seed=1)
        texts = [t for t, _ in pairs]
        assert len(set(texts)) == len(texts)
        for text, kind in pairs:
            kinds.add(kind)
            assert " ".join(text.lower().split()) != " ".join(caption.lower().split())
            assert sorted(text.lower().replace(",", "").replace(".", "").split()) != \
                sorted(caption.lower().replace(",", "").replace(".", "").split()) \
                or kind in ("swap_np", "swap_att", "swap_obj", "shuffle")
    assert kinds == {"swap_np", "swap_att", "swap_obj", "replace_att", "replace_rel", "shuffle"}


def test_rules_find_noun_phrases_and_relations():
    parsed = parse_rules("the big black dog is under the wooden table")
    phrases = [" ".join(parsed.words[p.start:p.end]) for p in parsed.phrases]
    assert phrases == ["the big black dog", "the wooden table"]
    assert [parsed.words[s:e] for s, e in parsed.relations] == [["under"]]
    swapped = dict((k, t) for t, k in hard_negatives(
        "the big black dog is under the wooden table", num=6, seed=0))
    assert swapped["swap_np"] == "the wooden table is under the big black dog"
    assert swapped["swap_obj"] == "the big black table is under the wooden dog"


def test_shards_negatives_writes_them_into_each_json(image_folder, tmp_path):
    stats = write_shards(folder_records(image_folder), tmp_path / "in", samples_per_shard=4,
                         progress=False, workers=1)
    totals = add_negatives(stats["spec"], tmp_path / "out", num=2, workers=2, progress=False)
    assert totals["samples"] == 7 and totals["shards"] == 2
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shard-{000000..000001}.tar"),
                                  shardshuffle=False, empty_check=False))
    assert len(samples) == 7
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["source"].startswith("part")  # what was there stays
        assert 1 <= len(meta["neg_captions"]) <= 2 and len(meta["neg_kinds"]) == len(
            meta["neg_captions"])
        assert sample["txt"].decode() not in meta["neg_captions"]
    # the training pipeline reads them as hard negatives
    loader = build_train_loader(str(tmp_path / "out" / "shard-{000000..000001}.tar"),
                                preprocess=preprocess, tokenizer=tokenizer, batch_size=7,
                                num_workers=0, mode="epoch", num_negatives=2)
    assert next(iter(loader))["neg_text"].shape == (7, 2, 2)


def test_validate_finds_the_corrupt_members_and_inspect_counts(tmp_path, capsys):
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "good", "png": png_bytes(1), "txt": "fine"})
        sink.write({"__key__": "badimg", "png": b"garbage", "txt": "fine"})
        sink.write({"__key__": "nocap", "png": png_bytes(2)})
        sink.write({"__key__": "empty", "png": png_bytes(3), "txt": " "})
    report = validate_shards(str(tmp_path / "a.tar"))
    assert report["num_samples"] == 4 and report["num_corrupt"] == 3
    reasons = {p["key"]: p["reason"] for p in report["corrupt"]}
    assert set(reasons) == {"badimg", "nocap", "empty"}
    assert "undecodable image" in reasons["badimg"] and "no txt" in reasons["nocap"]

    counts = inspect_shards(str(tmp_path / "a.tar"), show=2)
    assert counts["num_samples"] == 4 and counts["members"] == {"png": 4, "txt": 3}
    assert counts["samples"][0]["image"] == "PNG 4x4 RGB" and counts["samples"][0]["caption"] == "fine"

    assert main(["shards", "validate", str(tmp_path / "a.tar")]) == 1
    assert "a.tar key badimg: undecodable image" in capsys.readouterr().out
    assert main(["shards", "inspect", str(tmp_path / "a.tar"), "--show", "1"]) == 0
    assert "4 samples in 1 shards" in capsys.readouterr().out


def test_build_command(image_folder, tmp_path, capsys):
    assert main(["shards", "build", "--input", str(image_folder), "--out", str(tmp_path / "o"),
                 "--samples-per-shard", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 7 samples in 2 shards" in out and "skipped 1" in out
    assert main(["shards", "validate", str(tmp_path / "o" / "shard-{000000..000001}.tar")]) == 0
    assert main(["shards", "build", "--input", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "no such folder or table" in capsys.readouterr().err
