"""The `vlp data` converters (data_tools) on small hand-made files in each dataset's real format."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_tools import cc_tsv, fashion_mnist, karpathy_captions, laion_parquet
from vlp.cli import main as vlp_main
from vlp.eval.benchmark_data import iter_batches, read_benchmark


def jpeg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8), (shade, 40, 90)).save(path, format="JPEG")


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def captions_in(spec: str) -> list[str]:
    return [s["txt"].decode() for s in wds.WebDataset(spec, shardshuffle=False, empty_check=False)]


def karpathy_entry(i, split, filepath=None):
    entry = {"filename": f"img{i}.jpg", "split": split, "imgid": i,
             "sentences": [{"raw": f"image {i} caption {j} ", "tokens": []} for j in range(2)]}
    if filepath:
        entry.update(filepath=filepath, cocoid=1000 + i)
    return entry


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_karpathy_splits_become_training_shards_and_retrieval_sets(tmp_path, dataset):
    splits = ["train", "restval", "train", "val", "test", "test", "test"]
    entries = []
    for i, split in enumerate(splits):
        folder = ("val2014" if split != "train" else "train2014") if dataset == "coco" else None
        entries.append(karpathy_entry(i, split, folder))
        jpeg(tmp_path / "images" / (folder or "") / f"img{i}.jpg", i * 30)
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries, "dataset": dataset}))

    report = karpathy_captions.convert(tmp_path / "karpathy.json", tmp_path / "images",
                                       tmp_path / "out", workers=1, progress=False)
    assert report["train"] == 3 * 2  # train + restval images, every caption a pair
    assert sorted(captions_in(str(tmp_path / "out" / "train" / "shard-000000.tar"))) == sorted(
        f"image {i} caption {j}" for i in (0, 1, 2) for j in range(2))
    assert report["retrieval_test"] == {"images": 3, "missing": 0, "captions": 6, "shards": 1}

    benchmark = read_benchmark(tmp_path / "out" / "retrieval_test")
    assert benchmark.dataset_type == "retrieval"
    ((images, captions),) = list(iter_batches(benchmark, to_tensor, batch_size=8))
    assert images.shape == (3, 3, 8, 8)
    assert captions == [[f"image {i} caption {j}" for j in range(2)] for i in (4, 5, 6)]


def test_cc3m_and_cc12m_tsv_with_downloaded_images(tmp_path):
    urls = [f"http://example.com/{i}.jpg" for i in range(4)]
    captions = ["a dog on grass", "a \"quoted\" cat", "sunset, sea", "lost image"]
    (tmp_path / "cc3m.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in zip(captions, urls, strict=True)))
    (tmp_path / "cc12m.tsv").write_text("".join(f"{u}\t{c}\n" for c, u in zip(captions, urls, strict=True)))
    for row in range(3):  # the last image was never downloaded
        jpeg(tmp_path / "by_row" / f"{row // 2:05d}" / f"{row:09d}.jpg", row)
        jpeg(tmp_path / "by_sha1" / f"{hashlib.sha1(urls[row].encode()).hexdigest()}.jpg", row)

    for layout, folder, name_by in [("cc3m", "by_row", "row"), ("cc12m", "by_sha1", "sha1")]:
        records, missing = cc_tsv.records_from_tsv(tmp_path / f"{layout}.tsv",
                                                   tmp_path / folder, layout=layout,
                                                   name_by=name_by)
        assert missing == 1 and [r.caption for r in records] == captions[:3]
        assert [r.source for r in records] == urls[:3]
    assert vlp_main(["data", "cc", "--tsv", str(tmp_path / "cc3m.tsv"), "--layout", "cc3m",
                     "--images", str(tmp_path / "by_row"), "--out", str(tmp_path / "out"),
                     "--workers", "1"]) == 0
    assert captions_in(str(tmp_path / "out" / "shard-000000.tar")) == captions[:3]
    (tmp_path / "bad.tsv").write_text("only one field\n")
    with pytest.raises(ValueError, match="bad.tsv:1: expected 2 tab-separated fields"):
        cc_tsv.read_rows(tmp_path / "bad.tsv", "cc3m")


def test_laion_parquet_with_img2dataset_images(tmp_path):
    rows = pd.DataFrame({
        "URL": [f"http://x/{i}.jpg" for i in range(4)],
        "TEXT": ["red bus", "green tree", "not downloaded", "file lost"],
        "similarity": [0.31, 0.29, 0.35, 0.30],
        "key": ["000000000", "000000001", "000000002", "000000003"],
        "status": ["success", "success", "failed_to_download", "success"],
    })
    rows.to_parquet(tmp_path / "part-0.parquet")
    for i in (0, 1):
        jpeg(tmp_path / "files" / "00000" / f"{i:09d}.jpg", i)
    records, counts = laion_parquet.records_from_parquet(str(tmp_path / "*.parquet"),
                                                         tmp_path / "files")
    assert counts == {"rows": 4, "not_downloaded": 1, "no_image_file": 1}
    assert [r.caption for r in records] == ["red bus", "green tree"]
    assert records[0].extra["similarity"] == pytest.approx(0.31)
    assert vlp_main(["data", "laion-parquet", "--parquet", str(tmp_path / "part-0.parquet"),
                     "--images", str(tmp_path / "files"), "--out", str(tmp_path / "out"),
                     "--workers", "1"]) == 0
    (sample, _) = list(wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"),
                                      shardshuffle=False, empty_check=False))
    assert json.loads(sample["json"])["URL"] == "http://x/0.jpg"


@pytest.mark.skipif(not fashion_mnist.DEBIAN_DIR.is_dir(),
                    reason="Debian package dataset-fashion-mnist is not installed "
                           "(apt-get install dataset-fashion-mnist; .ci/run installs it)")
def test_fashion_mnist_converts_to_a_zero_shot_set_that_loads(tmp_path):
    report = fashion_mnist.convert(tmp_path / "fm", num_shards=2, limit=300)
    assert report["samples"] == 300 and sum(report["per_class"]) == 300
    benchmark = read_benchmark(tmp_path / "fm")
    assert benchmark.dataset_type == "classification" and len(benchmark.shard_paths) == 2
    assert benchmark.classnames == list(fashion_mnist.CLASSNAMES)
    assert "{c}" in benchmark.templates[0]
    labels = torch.cat([targets for _, targets in iter_batches(benchmark, to_tensor,
                                                                batch_size=128)])
    _, expected = fashion_mnist.load_split()
    assert labels.tolist() == expected[:300].tolist()
