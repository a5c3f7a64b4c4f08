"""One suite run encodes each distinct image and caption once (vlp.eval.cache): benchmarks on
the same root share its image embeddings, captions are looked up by text, and the numbers are
those of the benchmarks run one by one."""

from __future__ import annotations

import hashlib

import pytest
import torch
import yaml
from PIL import Image

from vlp.eval.benchmark_data import count_samples, read_benchmark, write_benchmark
from vlp.eval.cache import active_cache, suite_cache, tokenize
from vlp.eval.gap import evaluate_gap
from vlp.eval.order import evaluate_order
from vlp.eval.retrieval import evaluate_retrieval
from vlp.eval.runner import evaluate_suite
from vlp.eval.suite import load_suite
from vlp.eval.zeroshot import encode_texts

CAPTIONS = ["a red circle above a blue square", "two green stars left of a cross",
            "a small yellow triangle", "the big circle is below the small star",
            "a blue square right of a red cross", "three shapes on a white background"]


class CountingModel(torch.nn.Module):
    """Texts embed as a hash of their words' positions, images as their colour; every row
    encoded is counted."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.image_rows = 0
        self.text_rows = 0
        self.tokenized: list[str] = []

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        self.tokenized += texts
        rows = []
        for text in texts:
            digest = hashlib.sha256(text.encode()).digest()
            rows.append([b / 255.0 - 0.5 for b in digest[:8]])
        return torch.tensor(rows)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.text_rows += len(tokens)
        return tokens

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.image_rows += len(images)
        return torch.cat([images, images.flip(1), images[:, :2] - 0.2], dim=1)


def colour(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32) / 255.0


@pytest.fixture
def root(tmp_path):
    samples = [(Image.new("RGB", (4, 4), (40 * i, 200 - 30 * i, 7 * i)),
                [CAPTIONS[i], CAPTIONS[(i + 1) % len(CAPTIONS)]]) for i in range(len(CAPTIONS))]
    return write_benchmark(tmp_path / "retrieval", samples, dataset_type="retrieval", num_shards=2)


@pytest.fixture
def suite(tmp_path, root):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "shared", "batch_size": 4, "benchmarks": [
        {"name": "retrieval", "task": "retrieval", "data": str(root)},
        {"name": "order", "task": "order", "data": str(root), "options": {"tagger": "rules"}},
        {"name": "gap", "task": "gap", "data": str(root)}]}))
    return load_suite(path)


def test_suite_encodes_each_image_and_each_distinct_caption_once(tmp_path, suite):
    model = CountingModel()

    result = evaluate_suite(model, model.tokenizer, colour, suite, tmp_path / "out",
                            progress=False, write_files=False)

    assert model.image_rows == len(CAPTIONS)  # three benchmarks, one pass over the images
    assert len(model.tokenized) == len(set(model.tokenized))  # no text encoded twice
    assert set(CAPTIONS) <= set(model.tokenized)
    assert model.text_rows == len(model.tokenized)
    assert set(result.results) == {"retrieval", "order", "gap"}
    # every caption is encoded once although retrieval, order and gap all embed it
    counting = CountingModel()
    with suite_cache() as cache:
        encode_texts(counting, counting.tokenizer, CAPTIONS, device="cpu")
        encode_texts(counting, counting.tokenizer, CAPTIONS[::-1] + CAPTIONS[:2], device="cpu")
    assert counting.text_rows == len(CAPTIONS)
    assert cache.hits["texts"] == len(CAPTIONS) + 2
    assert active_cache() is None  # nothing outlives the run


def test_cached_suite_scores_equal_benchmarks_run_one_by_one(tmp_path, suite, root):
    model = CountingModel()

    result = evaluate_suite(model, model.tokenizer, colour, suite, tmp_path / "out",
                            progress=False, write_files=False)

    alone = {
        "retrieval": evaluate_retrieval(model, model.tokenizer, colour, root, batch_size=4,
                                        progress=False),
        "order": evaluate_order(model, model.tokenizer, colour, root, batch_size=4,
                                tagger="rules", progress=False).metrics,
        "gap": evaluate_gap(model, model.tokenizer, colour, root, batch_size=4,
                            progress=False).metrics,
    }
    for name, metrics in alone.items():
        suite_metrics = {k: result.results[name].metrics[k] for k in metrics}
        assert suite_metrics == pytest.approx(metrics, abs=1e-6), name


def test_token_ids_outlive_a_suite_run_while_its_tokenizer_lives(tmp_path, suite):
    model = CountingModel()
    tokenizer = model.tokenizer  # one tokenizer object for every evaluation, as in a training run

    for step in range(2):
        evaluate_suite(model, tokenizer, colour, suite, tmp_path / f"out{step}", progress=False,
                       write_files=False)

    distinct = set(model.tokenized)
    assert len(model.tokenized) == len(distinct)  # tokenized in the first run only
    assert model.text_rows == 2 * len(distinct)  # but encoded in both: the weights may change


def test_cached_token_ids_equal_the_tokenizer_s():
    import open_clip

    tokenizer = open_clip.get_tokenizer("RN50")
    texts = [CAPTIONS[2], CAPTIONS[0], CAPTIONS[2]]
    tokenize(tokenizer, CAPTIONS[:1])  # one text known beforehand

    assert torch.equal(tokenize(tokenizer, texts), tokenizer(texts))
    assert torch.equal(tokenize(tokenizer, texts[::-1]), tokenizer(texts[::-1]))


def test_count_samples_reads_the_tar_headers(root):
    assert count_samples(read_benchmark(root)) == len(CAPTIONS)
