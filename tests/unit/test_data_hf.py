"""A Hugging Face dataset as a training source, through the same batches as shards."""

from collections import Counter
from itertools import islice

import datasets
import pytest
from PIL import Image

from tests.unit.streaming_helpers import keys_of, preprocess, tokenizer
from vlp.data.pipeline import DataPosition, build_train_loader
from vlp.data.sources import HFSource, load_hf_dataset


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "pairs"
    rows = {"picture": [Image.new("RGB", (6, 6), (i, 0, 0)) for i in range(12)],
            "caption": [f"a red square number {i}" for i in range(12)]}
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}) \
        .save_to_disk(str(folder))
    return folder


def hf_loader(source, **kwargs):
    return build_train_loader(source, preprocess=preprocess, tokenizer=tokenizer, batch_size=4,
                              num_workers=kwargs.pop("num_workers", 0), **kwargs)


def test_saved_dataset_yields_batches_with_every_row_once_per_epoch(saved_dataset):
    source = HFSource(load_hf_dataset(str(saved_dataset), "train"), image_column="picture",
                      text_column="caption", mode="epoch")
    batches = list(islice(iter(hf_loader(source)), 3))
    assert batches[0]["image"].shape == (4, 3, 8, 8) and batches[0]["text"].shape == (4, 2)
    assert sorted(keys_of(batches)) == [f"{i:09d}" for i in range(12)]
    captions = {f"{i:09d}": f"a red square number {i}" for i in range(12)}
    for batch in batches:  # each caption travels with its own row
        assert batch["text"].tolist() == tokenizer([captions[k] for k in batch["key"]]).tolist()


def test_streaming_dataset_splits_over_workers_and_resumes(saved_dataset):
    def source():
        return HFSource(load_hf_dataset(str(saved_dataset), "train", streaming=True),
                        image_column="picture", text_column="caption", mode="epoch",
                        shuffle_buffer=4)

    batches = list(islice(iter(hf_loader(source(), num_workers=2)), 6))
    uninterrupted = keys_of(batches)
    # 2 workers x 6 rows each: 6 batches of 4 are two epochs, every caption read twice
    texts = Counter(tuple(t) for batch in batches for t in batch["text"].tolist())
    assert texts == {tuple(t): 2 for t in tokenizer([f"a red square number {i}"
                                                     for i in range(12)]).tolist()}
    used = DataPosition(num_workers=2)
    for batch in islice(iter(hf_loader(source(), num_workers=2)), 3):
        used.update(batch)
    resumed = islice(iter(hf_loader(source(), num_workers=2,
                                    start=DataPosition.start_from(used.state_dict()))), 3)
    assert keys_of(resumed) == uninterrupted[12:]


def test_missing_column_is_named(saved_dataset):
    with pytest.raises(ValueError, match="data.hf.text_column: .* no column 'text'"):
        HFSource(load_hf_dataset(str(saved_dataset), "train"), image_column="picture")
    with pytest.raises(ValueError, match=r"data.hf.split: .* has splits \['train'\]"):
        load_hf_dataset(str(saved_dataset), "validation")
