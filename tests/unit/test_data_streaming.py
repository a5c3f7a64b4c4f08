"""Streaming at scale: epoch and resampled modes, mixtures, corrupt samples, exact resume."""

from collections import Counter
from itertools import islice

import pytest
import webdataset as wds

from tests.unit.streaming_helpers import keys_of, png_bytes, preprocess, tokenizer
from vlp.data.pipeline import DataPosition, build_train_loader
from vlp.data.sources import SHARDS_PER_ROUND, ShardSource, Stream


def write_shard(path, keys: list[str]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i, key in enumerate(keys):
            sink.write({"__key__": key, "png": png_bytes(i), "txt": f"caption of {key}"})


def make_shards(folder, sizes: list[int], prefix: str = "s") -> str:
    """Shards `{prefix}{shard}.tar` holding `sizes[shard]` samples keyed `{prefix}{shard}-{i}`."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard, size in enumerate(sizes):
        write_shard(folder / f"{prefix}{shard}.tar", [f"{prefix}{shard}-{i}" for i in range(size)])
    return str(folder / f"{prefix}{{0..{len(sizes) - 1}}}.tar")


def loader(spec, **kwargs):
    options = {"preprocess": preprocess, "tokenizer": tokenizer, "batch_size": 4,
               "num_workers": 0, "shuffle_buffer": 0, "seed": 0, **kwargs}
    return build_train_loader(spec, **options)


def test_corrupt_members_are_skipped_counted_and_the_epoch_still_ends(tmp_path, caplog):
    samples = [{"__key__": f"k{i}", "png": png_bytes(i), "txt": f"caption {i}"} for i in range(17)]
    samples[1]["png"] = b"not a png"
    samples[4]["txt"] = "   "
    del samples[6]["txt"]
    del samples[9]["png"]
    samples[12]["txt"] = b"\xff\xfe"
    bad = {"k1", "k4", "k6", "k9", "k12"}
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for sample in samples[:8]:
            sink.write(sample)
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        for sample in samples[8:]:
            sink.write(sample)

    # 12 good samples: one epoch is 4 batches of 3, and every planted member is met on the way
    batches = list(islice(iter(loader(str(tmp_path / "{a,b}.tar"), mode="epoch",
                                      batch_size=3)), 4))
    assert sorted(keys_of(batches)) == sorted(f"k{i}" for i in range(17) if f"k{i}" not in bad)
    assert batches[-1]["skipped"] == 5 and tuple(batches[-1]["position"]) == (0, 17)
    logged = caplog.text
    for key, reason in [("k1", "undecodable image"), ("k4", "empty caption"),
                        ("k6", "no txt member"), ("k9", "no image member"), ("k12", "caption")]:
        assert f"key {key}): " in logged and reason in logged
    assert "a.tar" in logged and "b.tar" in logged


def test_epoch_mode_reads_every_sample_once_per_epoch_in_a_new_order(tmp_path):
    spec = make_shards(tmp_path, [8, 8, 8])
    stream = iter(loader(spec, mode="epoch", shuffle_buffer=8))
    first, second = keys_of(islice(stream, 6)), keys_of(islice(stream, 6))
    assert sorted(first) == sorted(second) == sorted(f"s{s}-{i}" for s in range(3)
                                                     for i in range(8))
    assert first != second


def test_epoch_mode_with_fewer_shards_than_workers_is_a_clear_error(tmp_path):
    spec = make_shards(tmp_path, [4, 4, 4])
    with pytest.raises(ValueError, match=r"3 shards < 2 ranks x 2 workers"):
        loader(spec, mode="epoch", num_workers=2, world_size=2, rank=0)


def test_resampled_mode_serves_more_workers_than_shards(tmp_path):
    spec = make_shards(tmp_path, [4, 4, 4])
    for rank in range(2):
        batches = list(islice(iter(loader(spec, num_workers=2, world_size=2, rank=rank)), 4))
        assert [b["worker"] for b in batches] == [0, 1, 0, 1]
        assert all(len(b["key"]) == 4 for b in batches)


def test_every_rank_gets_the_same_batches_however_the_shards_fall(tmp_path):
    """Rank 1 holds 4 samples per epoch, rank 0 40: rank 1 moves on to its next epochs and
    never runs dry, so both ranks step together for as long as training asks."""
    spec = make_shards(tmp_path, [20, 20, 4, 20])
    seen = {}
    for rank in range(2):
        batches = list(islice(iter(loader(spec, mode="epoch", world_size=2, rank=rank)), 25))
        assert len(batches) == 25 and all(len(b["key"]) == 4 for b in batches)
        seen[rank] = {b["position"][0] for b in batches}
    assert min(len(epochs) for epochs in seen.values()) >= 2  # a short rank wrapped around


@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_resume_continues_with_the_batches_an_uninterrupted_run_reads(tmp_path, mode):
    spec = make_shards(tmp_path, [10, 7, 9, 12])
    options = {"mode": mode, "num_workers": 2, "shuffle_buffer": 6, "seed": 3}
    uninterrupted = keys_of(islice(iter(loader(spec, **options)), 12))

    used = DataPosition(num_workers=2)
    first_run = iter(loader(spec, **options))
    for batch in islice(first_run, 7):  # the workers have prefetched more than these
        used.update(batch)
    start = DataPosition.start_from(used.state_dict())
    assert start.next_worker == 1
    resumed = keys_of(islice(iter(loader(spec, start=start, **options)), 5))
    assert resumed == uninterrupted[7 * 4:]


def test_resume_keeps_counting_skipped_samples(tmp_path):
    write_shard(tmp_path / "a.tar", [f"k{i}" for i in range(6)])
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        sink.write({"__key__": "bad", "png": b"xx", "txt": "broken"})
    used = DataPosition(num_workers=0)
    batches = iter(loader(str(tmp_path / "{a,b}.tar"), mode="epoch", batch_size=3))
    for batch in islice(batches, 4):
        total = used.update(batch)
    start = DataPosition.start_from(used.state_dict())
    after = next(iter(loader(str(tmp_path / "{a,b}.tar"), mode="epoch", batch_size=3,
                             start=start)))
    assert after["skipped"] >= total >= 1


def test_mixture_weights_set_each_source_share_of_the_draws(tmp_path):
    spec = make_shards(tmp_path / "a", [2] * 10, "a") + "::" + make_shards(tmp_path / "b",
                                                                           [2] * 3, "b")
    source = ShardSource(spec, weights=[3, 1], seed=0)
    draws = Counter(url.split("/")[-2] for r in range(1000) for w in range(2)
                    for url in source.shards(r, Stream(worker=w, num_workers=2)))
    assert sum(draws.values()) == 1000 * 2 * SHARDS_PER_ROUND
    assert draws["a"] / sum(draws.values()) == pytest.approx(0.75, abs=0.02)
    unweighted = ShardSource(spec, seed=0)  # without weights each shard is equally likely
    draws = Counter(url.split("/")[-2] for r in range(1000) for url in unweighted.shards(r, Stream()))
    assert draws["a"] / sum(draws.values()) == pytest.approx(10 / 13, abs=0.02)


def test_mixture_batches_follow_the_weights(tmp_path):
    spec = make_shards(tmp_path / "a", [4] * 4, "a") + "::" + make_shards(tmp_path / "b",
                                                                          [4] * 4, "b")
    keys = keys_of(islice(iter(loader(spec, weights=[1, 4], batch_size=32)), 20))
    share_b = sum(key.startswith("b") for key in keys) / len(keys)
    assert share_b == pytest.approx(0.8, abs=0.1)


def test_weights_must_match_the_spec(tmp_path):
    spec = make_shards(tmp_path, [2, 2])
    with pytest.raises(ValueError, match="need 1 non-negative weights"):
        ShardSource(spec, weights=[1, 2])
    with pytest.raises(ValueError, match="needs data.mode: resampled"):
        ShardSource(spec, weights=[1], mode="epoch")


def test_a_stream_with_nothing_usable_stops_with_an_error_instead_of_spinning(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "png": b"not an image", "txt": "caption"})
    for mode in ("epoch", "resampled"):
        with pytest.raises(RuntimeError, match="no usable sample in 3 rounds in a row"):
            next(iter(loader(str(tmp_path / "bad.tar"), mode=mode)))
