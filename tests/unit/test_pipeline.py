"""The training stream: decode, tokenize, batch; skip and count what cannot be used."""

import io
from itertools import islice

import pytest
import torch
import webdataset as wds
from PIL import Image

from vlp.data.pipeline import SkippedTotal, build_train_loader, decode_sample, expand_shards
from vlp.models import build_model


@pytest.fixture(scope="module")
def bundle():
    return build_model("vlp-tiny")


def png_bytes(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def good(i):
    return {"__key__": f"s{i:05d}", "png": png_bytes((i % 256, 0, 0)), "txt": f"sample {i}"}


def raw(sample):
    """A sample as tar members arrive: bytes, except the key."""
    return {k: v.encode() if isinstance(v, str) and k != "__key__" else v
            for k, v in sample.items()}


def test_brace_expansion_and_mixtures_expand_to_every_shard():
    assert expand_shards("d/{000..002}.tar::e/x.tar") == [
        "d/000.tar", "d/001.tar", "d/002.tar", "e/x.tar"]


def test_decode_produces_model_inputs(bundle):
    out = decode_sample(raw(good(3)), bundle.preprocess_val, bundle.tokenizer)
    assert out["image"].shape == (3, 64, 64)
    assert out["text"].dtype == torch.long and out["text"].shape == (32,)
    assert out["key"] == "s00003"


@pytest.mark.parametrize(
    "sample, reason",
    [
        ({"__key__": "k", "txt": "a"}, "no image member"),
        ({"__key__": "k", "png": png_bytes((1, 2, 3))}, "no txt member"),
        ({"__key__": "k", "png": png_bytes((1, 2, 3)), "txt": "  "}, "empty caption"),
        ({"__key__": "k", "png": b"not an image", "txt": "a"}, "undecodable image"),
        ({"__key__": "k", "png": png_bytes((1, 2, 3)), "txt": b"\xff\xfe"}, "utf-8"),
    ],
)
def test_bad_sample_raises_naming_the_problem(bundle, sample, reason):
    with pytest.raises(ValueError, match=reason):
        decode_sample(raw(sample), bundle.preprocess_val, bundle.tokenizer)


def test_corrupt_samples_are_skipped_and_counted(tmp_path, bundle):
    samples = [good(i) for i in range(10)]
    samples[2]["png"] = b"garbage"
    samples[5]["txt"] = ""
    del samples[7]["txt"]
    write_shard(tmp_path / "a.tar", samples)
    loader = build_train_loader(
        str(tmp_path / "a.tar"), preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer,
        batch_size=7, num_workers=0, shuffle_buffer=0, seed=0, rank=0)
    first, second = islice(iter(loader), 2)
    # the shard is read again and again (resampled); each pass yields 7 good samples, skips 3
    assert first["image"].shape == (7, 3, 64, 64) and first["text"].shape == (7, 32)
    assert {"s00002", "s00005", "s00007"}.isdisjoint(first["key"] + second["key"])
    assert first["skipped"] == 3 and second["skipped"] == 6


def test_skipped_total_sums_workers():
    total = SkippedTotal()
    total.update({"worker": 0, "skipped": 2})
    total.update({"worker": 1, "skipped": 1})
    assert total.update({"worker": 0, "skipped": 3}) == 4


def test_ranks_read_different_streams(tmp_path, bundle):
    for s in range(4):
        write_shard(tmp_path / f"{s}.tar", [good(s * 100 + i) for i in range(20)])

    def first_keys(rank):
        loader = build_train_loader(
            str(tmp_path / "{0..3}.tar"), preprocess=bundle.preprocess_val,
            tokenizer=bundle.tokenizer, batch_size=16, num_workers=0, shuffle_buffer=8,
            seed=0, rank=rank)
        return [k for batch in islice(iter(loader), 3) for k in batch["key"]]

    assert first_keys(0) == first_keys(0)  # deterministic for a given seed and rank
    assert first_keys(0) != first_keys(1)
