"""Damaged shards planted byte by byte: every good sample is read, and every lost one is counted
exactly once, the same by training and by `vlp shards validate`."""

import io
import json
import tarfile

import pytest

from tests.unit.streaming_helpers import png_bytes, preprocess, tokenizer
from vlp.cli import main
from vlp.data.pipeline import build_train_loader
from vlp.data.shard_inspect import validate_shards


def members(i: int, *, negatives: int = 0) -> dict[str, bytes]:
    out = {"png": png_bytes(i)}
    if negatives:
        out["json"] = json.dumps({"neg_captions": [f"not {i} ({n})" for n in range(negatives)]
                                  }).encode()
    return {**out, "txt": f"caption {i}".encode()}


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> dict[str, tarfile.TarInfo]:
    """Write the samples in order; return each member's TarInfo (header and data offsets)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def garble_headers(path, infos: list[tarfile.TarInfo]) -> None:
    data = bytearray(path.read_bytes())
    for info in infos:
        data[info.offset:info.offset + 100] = b"\xff" * 100  # the name field: checksum fails
    path.write_bytes(bytes(data))


def one_epoch(path, num_good: int) -> tuple[list[str], int]:
    """Keys of the first epoch's batches, and the skip count once that epoch is read (the
    next epoch starts with a good sample in every planted shard)."""
    loader = build_train_loader(str(path), preprocess=preprocess, tokenizer=tokenizer,
                                batch_size=1, num_workers=0, mode="epoch")
    batches = iter(loader)
    first = [next(batches) for _ in range(num_good)]
    return [b["key"][0] for b in first], next(batches)["skipped"]


def keys(n: int) -> list[str]:
    return [f"s{i:03d}" for i in range(n)]


def test_a_truncated_member_is_one_skipped_sample(tmp_path):
    shard = tmp_path / "cut.tar"
    infos = write_tar(shard, [(k, members(i)) for i, k in enumerate(keys(5))])
    cut = infos["s004.png"]
    shard.write_bytes(shard.read_bytes()[: cut.offset_data + cut.size // 2])

    read, skipped = one_epoch(shard, 4)
    assert read == keys(4) and skipped == 1
    report = validate_shards(str(shard))
    assert report["num_samples"] == 5 and report["num_corrupt"] == 1
    assert "truncated" in report["corrupt"][0]["reason"] and report["corrupt"][0]["key"] == "s004"


@pytest.mark.parametrize("garbled", ["s002.txt", "s002.png"])
def test_a_bad_tar_header_loses_its_sample_only_and_the_rest_of_the_shard_is_read(
        tmp_path, garbled):
    shard = tmp_path / "bad-header.tar"
    infos = write_tar(shard, [(k, members(i)) for i, k in enumerate(keys(10))])
    garble_headers(shard, [infos[garbled]])

    good = [k for k in keys(10) if k != "s002"]
    read, skipped = one_epoch(shard, 9)
    assert read == good and skipped == 1  # the 7 samples after it are read
    report = validate_shards(str(shard))
    assert report["num_corrupt"] == 1 and report["corrupt"][0]["key"] == "s002"


def test_a_whole_sample_lost_between_two_good_ones_counts_once(tmp_path):
    shard = tmp_path / "hole.tar"
    infos = write_tar(shard, [(k, members(i)) for i, k in enumerate(keys(6))])
    garble_headers(shard, [infos["s003.png"], infos["s003.txt"]])

    read, skipped = one_epoch(shard, 5)
    assert read == ["s000", "s001", "s002", "s004", "s005"] and skipped == 1
    report = validate_shards(str(shard))
    assert report["num_samples"] == 5 and report["num_corrupt"] == 1
    assert report["corrupt"][0]["key"] == "?" and "unreadable tar data" in \
        report["corrupt"][0]["reason"]


def test_an_unreadable_member_inside_a_sample_skips_that_sample_once(tmp_path):
    shard = tmp_path / "inner.tar"
    infos = write_tar(shard, [(k, members(i, negatives=2)) for i, k in enumerate(keys(4))])
    garble_headers(shard, [infos["s001.json"]])  # between s001.png and s001.txt

    read, skipped = one_epoch(shard, 3)
    assert read == ["s000", "s002", "s003"] and skipped == 1
    assert validate_shards(str(shard))["num_corrupt"] == 1


def test_a_key_that_comes_back_later_is_read_once_and_its_repeat_counted(tmp_path):
    """A later sample with a used key is skipped; a member name twice in a row makes its
    sample ambiguous, so it is skipped too: each counted once."""
    shard = tmp_path / "dup.tar"
    write_tar(shard, [("a", members(0)), ("b", members(1)), ("c", members(2)),
                      ("b", members(3)), ("d", members(4)), ("d", {"txt": b"again"})])

    read, skipped = one_epoch(shard, 3)
    assert read == ["a", "b", "c"] and skipped == 2
    report = validate_shards(str(shard))
    assert report["num_samples"] == 5 and report["num_corrupt"] == 2
    reasons = {p["key"]: p["reason"] for p in report["corrupt"]}
    assert "duplicate key b" in reasons["b"] and "d.txt appears twice" in reasons["d"]


def test_a_shard_cut_between_samples_counts_one_lost_sample(tmp_path):
    shard = tmp_path / "short.tar"
    infos = write_tar(shard, [(k, members(i)) for i, k in enumerate(keys(4))])
    end = infos["s002.txt"].offset_data + 100  # inside the padding after s002's caption
    shard.write_bytes(shard.read_bytes()[:end])

    read, skipped = one_epoch(shard, 3)
    assert read == keys(3) and skipped == 1
    report = validate_shards(str(shard))
    assert report["num_corrupt"] == 1 and "ends early" in report["corrupt"][0]["reason"]


def test_validate_requires_the_number_of_hard_negatives_asked_for(tmp_path):
    shard = tmp_path / "negs.tar"
    write_tar(shard, [("three", members(0, negatives=3)), ("two", members(1, negatives=2))])
    assert validate_shards(str(shard), num_negatives=2)["num_corrupt"] == 0
    report = validate_shards(str(shard), num_negatives=3)
    assert [p["key"] for p in report["corrupt"]] == ["two"]
    assert "2 distinct hard negatives, fewer than 3" in report["corrupt"][0]["reason"]


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_shard_tools_name_a_missing_shard_or_a_folder_instead_of_counting_zero(
        tmp_path, capsys, command):
    write_tar(tmp_path / "a.tar", [("k", members(0))])
    for spec, message in [(f"{tmp_path}/missing.tar", "no such shard: "),
                          (f"{tmp_path}/{{a,b}}.tar", f"no such shard: {tmp_path}/b.tar"),
                          (str(tmp_path), "is a folder, not a shard")]:
        assert main(["shards", command, spec]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and f"vlp shards {command}: error: " in lines[0]
        assert message in lines[0]


def test_well_formed_tars_count_nothing_pax_headers_metadata_and_concatenation(tmp_path):
    shard = tmp_path / "pax.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "a global header"}) as tar:
        for key, parts in [("a", members(0)), ("__meta__/info", {"json": b"{}"}),
                           ("b", members(1))]:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.pax_headers = {"comment": "a member header"}
                tar.addfile(info, io.BytesIO(data))
    second = tmp_path / "second.tar"
    write_tar(second, [("c", members(2))])
    both = tmp_path / "both.tar"  # `cat first.tar second.tar`: zero blocks in the middle
    both.write_bytes(shard.read_bytes() + second.read_bytes())

    for path, expected in [(shard, ["a", "b"]), (both, ["a", "b", "c"])]:
        read, skipped = one_epoch(path, len(expected))
        assert read == expected and skipped == 0
        report = validate_shards(str(path))
        assert report["num_samples"] == len(expected) and report["num_corrupt"] == 0
