"""The shard reader against hostile input: every bad sample is skipped and counted, every good
sample comes through, and nothing crashes or writes outside the reader's own memory."""

import io
import json
import logging
import random
import struct
import tarfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data.limits import SampleLimits, read_caption, read_image
from vlp.data.pipeline import build_train_loader

SIDE = 8


def preprocess(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image.resize((SIDE, SIDE)), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)


def tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t) % 1000, 1, 2, 3] for t in texts])


def png(rng: random.Random) -> bytes:
    size = (rng.randint(2, 24), rng.randint(2, 24))
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


WORDS = ["red", "small", "circle", "left of", "a", "blue", "café", "☕", "große", "square"]


def good_members(rng: random.Random) -> dict[str, bytes]:
    caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
    negatives = {"neg_captions": [caption[::-1] or "x", "a different caption"]}
    return {"png": png(rng), "txt": caption.encode(), "json": json.dumps(negatives).encode()}


# Each bad kind: how to spoil a good sample, and a phrase the skip warning must contain.
BAD_KINDS = {
    "random image bytes": (lambda m, r: {**m, "png": r.randbytes(200)}, "undecodable image"),
    "truncated image": (lambda m, r: {**m, "png": m["png"][: len(m["png"]) // 2]},
                        "undecodable image"),
    "no image": (lambda m, r: {k: v for k, v in m.items() if k != "png"}, "no image member"),
    "no caption": (lambda m, r: {k: v for k, v in m.items() if k != "txt"}, "no txt member"),
    "empty caption": (lambda m, r: {**m, "txt": b"  \n\t "}, "empty caption"),
    "binary caption": (lambda m, r: {**m, "txt": b"\xff\xfe\x80" + r.randbytes(50)},
                       "not valid utf-8"),
    "1 MB caption": (lambda m, r: {**m, "txt": b"a" * (1 << 20)}, "max_caption_chars"),
    "70k-character caption": (lambda m, r: {**m, "txt": "é".encode() * 70_000},
                              "max_caption_chars"),
    "50k x 50k image header": (lambda m, r: {**m, "png": png_header_only(50_000, 50_000)},
                               "image too large"),
    "9k x 9k image header": (lambda m, r: {**m, "png": png_header_only(9_000, 9_000)},
                             "max_image_pixels"),
    "bad json": (lambda m, r: {**m, "json": b"{not json"}, "not a JSON object"),
    "json without negatives": (lambda m, r: {**m, "json": b'{"other": 1}'}, "neg_captions"),
    "json that is a list": (lambda m, r: {**m, "json": b"[1, 2]"}, "not a JSON object"),
}


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read(spec: str, num_batches: int, **kwargs) -> list[dict]:
    loader = build_train_loader(spec, preprocess=preprocess, tokenizer=tokenizer, batch_size=1,
                                num_workers=0, mode="epoch", **kwargs)
    batches = iter(loader)
    return [next(batches) for _ in range(num_batches)]


def test_every_bad_sample_is_skipped_and_counted_and_every_good_one_comes_through(
        tmp_path, caplog):
    rng = random.Random(0)
    kinds = [kind for kind in sorted(BAD_KINDS) for _ in range(2)]
    rng.shuffle(kinds)
    samples, good_keys, expected_reason = [], [], {}
    for i, kind in enumerate(kinds):
        good_keys.append(f"good{i:03d}")
        samples.append((good_keys[-1], good_members(rng)))
        spoil, reason = BAD_KINDS[kind]
        samples.append((f"bad{i:03d}", spoil(good_members(rng), rng)))
        expected_reason[f"bad{i:03d}"] = reason
    good_keys.append("good-last")
    samples.append((good_keys[-1], good_members(rng)))
    write_tar(tmp_path / "shard.tar", samples)

    with caplog.at_level(logging.WARNING, logger="vlp.data.pipeline"):
        batches = read(str(tmp_path / "shard.tar"), len(good_keys), num_negatives=1)

    assert [b["key"][0] for b in batches] == good_keys
    assert batches[-1]["skipped"] == len(kinds)
    for batch in batches:
        assert batch["image"].shape == (1, 3, SIDE, SIDE) and batch["neg_text"].shape[1] == 1
    warnings = {key: [r.getMessage() for r in caplog.records if f"key {key})" in r.getMessage()]
                for key in expected_reason}
    for key, reason in expected_reason.items():
        assert len(warnings[key]) == 1 and reason in warnings[key][0], (key, warnings[key])


def test_a_truncated_shard_loses_only_its_cut_sample_and_reading_goes_on(tmp_path):
    rng = random.Random(1)
    write_tar(tmp_path / "cut.tar", [(f"cut{i}", good_members(rng)) for i in range(4)])
    write_tar(tmp_path / "whole.tar", [(f"whole{i}", good_members(rng)) for i in range(3)])
    with tarfile.open(tmp_path / "cut.tar") as tar:
        last_png = tar.getmember("cut3.png")
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: last_png.offset_data + last_png.size // 2])

    batches = read(f"{tmp_path}/{{cut,whole}}.tar", 13)

    keys = [b["key"][0] for b in batches[:12]]
    assert set(keys) == {"cut0", "cut1", "cut2", "whole0", "whole1", "whole2"}
    assert keys[:6].count("cut0") == 1 and keys[6:12].count("cut0") == 1  # two full epochs
    # the cut sample is counted once per epoch; the third epoch's comes after its 3 cut* ones
    assert batches[12]["skipped"] == 2


@pytest.mark.parametrize("seed", range(16))
def test_randomly_corrupted_shards_never_crash_the_reader(tmp_path, seed):
    rng = random.Random(seed)
    written = [(f"s{i:02d}", good_members(rng)) for i in range(6)]
    write_tar(tmp_path / "fuzzed.tar", written)
    write_tar(tmp_path / "intact.tar", [("intact", good_members(rng))])
    data = bytearray((tmp_path / "fuzzed.tar").read_bytes())
    for _ in range(rng.choice([1, 2, 3, 8])):  # change bytes anywhere: headers, members
        data[rng.randrange(len(data))] = rng.randrange(256)
    if rng.random() < 0.5:
        data = data[: rng.randrange(len(data))]
    (tmp_path / "fuzzed.tar").write_bytes(bytes(data))

    batches = read(f"{tmp_path}/{{fuzzed,intact}}.tar", 9)

    skipped = [b["skipped"] for b in batches]
    assert skipped == sorted(skipped)
    assert "intact" in {b["key"][0] for b in batches}
    for batch in batches:
        assert batch["image"].shape == (1, 3, SIDE, SIDE)
        assert torch.isfinite(batch["image"]).all()


def test_tar_paths_and_links_are_never_written_or_followed(tmp_path):
    rng = random.Random(2)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(png(rng))
    shards = tmp_path / "shards"
    shards.mkdir()
    absolute = Path(f"/tmp/vlp-fuzz-{uuid.uuid4().hex}.txt")
    with tarfile.open(shards / "evil.tar", "w") as tar:
        for name, data in [("../outside/escape.png", png(rng)), ("../outside/escape.txt", b"x"),
                           (str(absolute), b"y")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for kind, name in [(tarfile.SYMTYPE, "linked.png"), (tarfile.LNKTYPE, "hard.png")]:
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, str(secret)
            tar.addfile(link)
        for name, data in [("linked.txt", b"a caption"), ("hard.txt", b"another")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_tar(shards / "fine.tar", [("fine", good_members(rng))])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    batches = read(f"{shards}/{{evil,fine}}.tar", 4)

    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not absolute.exists()
    keys = {b["key"][0] for b in batches}
    # The `../` name is only a sample key (the reader never extracts to disk); the link
    # members are not regular files, so their samples have no image and are skipped.
    assert keys == {"../outside/escape", "fine"}
    assert batches[-1]["skipped"] >= 2


def test_limits_are_configurable():
    limits = SampleLimits(max_caption_chars=5, max_image_pixels=100)
    assert read_caption(b" short ", limits) == "short"
    with pytest.raises(ValueError, match="6 characters is over data.max_caption_chars=5"):
        read_caption(b"longer", limits)
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, format="PNG")
    assert read_image(buffer.getvalue(), limits).size == (10, 10)
    with pytest.raises(ValueError, match="11x10 pixels .* over data.max_image_pixels=100"):
        read_image(png_header_only(11, 10), limits)
