"""vlp's zero-shot and retrieval scores equal the clip_benchmark package's on the same data.

One tiny random open_clip model; roots in the CLIP_benchmark webdataset layout, which
clip_benchmark reads with its own `build_wds_dataset` and DataLoader, as its CLI does for `wds/`
datasets. Needs the `clip-benchmark` package (a test extra): without it this module fails to
import, on purpose, rather than skipping.
"""

from __future__ import annotations

import builtins
import json

import numpy as np
import open_clip
import pytest
import torch
from clip_benchmark.datasets.builder import build_wds_dataset
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from PIL import Image

from vlp.eval import (
    evaluate_retrieval,
    evaluate_zeroshot,
    predict_zeroshot,
    write_benchmark,
    zero_shot_classifier,
)

MODEL_NAME = "vlp-test-parity-tiny"
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSNAMES = ["apple", "boat", "cloud", "dog", "engine", "forest", "guitar"]
TEMPLATES = ["a photo of a {c}.", "a blurry {c}.", "art of the {c}."]
WORDS = ["red", "small", "cat", "on", "a", "table", "blue", "car", "near", "tree", "two", "birds"]
BATCH_SIZE = 8

pytestmark = pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle=...\\) is None")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random open_clip CLIP small enough for CPU tests, with its tokenizer and transform.

    Weight matrices are redrawn with a large std: at open_clip's initialisation every image
    lands on the same class, which would leave the per-class recall untested."""
    config = tmp_path_factory.mktemp("open_clip_configs") / f"{MODEL_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.ndim >= 2):
            weight.normal_(0.0, 0.3)
    return model.eval(), open_clip.get_tokenizer(MODEL_NAME), preprocess


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def random_image(rng: np.random.Generator) -> Image.Image:
    """A plain background with a square of another colour somewhere on it."""
    pixels = np.empty((40, 40, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, size=3)
    x, y = rng.integers(0, 30, size=2)
    pixels[y : y + 10, x : x + 10] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels)


def clip_benchmark_loader(root, preprocess) -> torch.utils.data.DataLoader:
    """The DataLoader clip_benchmark's CLI builds for a `wds/...` dataset."""
    dataset = build_wds_dataset("parity", transform=preprocess, split="test", data_dir=str(root))
    return torch.utils.data.DataLoader(
        dataset.batched(BATCH_SIZE), batch_size=None, shuffle=False, num_workers=0
    )


def float_of_one_element(value):
    """`float()` that also takes one-element arrays, as NumPy < 2.4 did; clip-benchmark 1.6.2's
    `accuracy()` calls `float()` on such an array."""
    if isinstance(value, np.ndarray):
        return builtins.float(value.item())
    return builtins.float(value)


@pytest.fixture
def classification_root(tmp_path, rng):
    samples = [(random_image(rng), int(rng.integers(0, len(CLASSNAMES)))) for _ in range(30)]
    return write_benchmark(
        tmp_path / "classification", samples, classnames=CLASSNAMES, templates=TEMPLATES,
        num_shards=2, image_format="webp",
    )  # fmt: skip


@pytest.fixture
def retrieval_root(tmp_path, rng):
    def caption() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))

    samples = [
        (random_image(rng), [caption() for _ in range(int(rng.integers(1, 4)))]) for _ in range(14)
    ]
    return write_benchmark(tmp_path / "retrieval", samples, dataset_type="retrieval", num_shards=2)


def test_zeroshot_metrics_equal_clip_benchmarks(tiny_clip, classification_root, monkeypatch):
    model, tokenizer, preprocess = tiny_clip
    monkeypatch.setattr(zeroshot_classification, "float", float_of_one_element, raising=False)

    expected = zeroshot_classification.evaluate(
        model, clip_benchmark_loader(classification_root, preprocess), tokenizer,
        CLASSNAMES, TEMPLATES, device="cpu", amp=False,
    )  # fmt: skip
    metrics = evaluate_zeroshot(
        model, tokenizer, preprocess, classification_root, batch_size=BATCH_SIZE, progress=False
    )

    assert metrics == pytest.approx(expected, rel=0, abs=1e-12)


def test_zeroshot_metrics_with_fewer_than_five_classes_equal_clip_benchmarks(
    tiny_clip, tmp_path, rng, monkeypatch
):
    model, tokenizer, preprocess = tiny_clip
    monkeypatch.setattr(zeroshot_classification, "float", float_of_one_element, raising=False)
    classnames = CLASSNAMES[:3]
    samples = [(random_image(rng), int(rng.integers(0, 3))) for _ in range(12)]
    root = write_benchmark(tmp_path / "three", samples, classnames=classnames, templates=TEMPLATES)

    expected = zeroshot_classification.evaluate(
        model, clip_benchmark_loader(root, preprocess), tokenizer,
        classnames, TEMPLATES, device="cpu", amp=False,
    )  # fmt: skip
    metrics = evaluate_zeroshot(
        model, tokenizer, preprocess, root, batch_size=BATCH_SIZE, progress=False
    )

    assert np.isnan(expected["acc5"]) and np.isnan(metrics["acc5"])
    assert metrics == pytest.approx(expected, rel=0, abs=1e-12, nan_ok=True)


def test_zeroshot_classifier_and_logits_equal_clip_benchmarks(tiny_clip, classification_root):
    model, tokenizer, preprocess = tiny_clip

    expected_classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, CLASSNAMES, TEMPLATES, "cpu", amp=False
    )
    expected_logits, expected_targets = zeroshot_classification.run_classification(
        model, expected_classifier, clip_benchmark_loader(classification_root, preprocess),
        "cpu", amp=False,
    )  # fmt: skip
    classifier = zero_shot_classifier(
        model, tokenizer, CLASSNAMES, TEMPLATES, device="cpu", batch_size=BATCH_SIZE
    )
    predictions = predict_zeroshot(
        model, tokenizer, preprocess, classification_root, batch_size=BATCH_SIZE, progress=False
    )

    torch.testing.assert_close(classifier, expected_classifier, rtol=0, atol=1e-6)
    torch.testing.assert_close(predictions.logits, expected_logits, rtol=0, atol=1e-4)
    assert predictions.targets.tolist() == expected_targets.tolist()


def test_retrieval_metrics_equal_clip_benchmarks(tiny_clip, retrieval_root):
    model, tokenizer, preprocess = tiny_clip

    expected = zeroshot_retrieval.evaluate(
        model, clip_benchmark_loader(retrieval_root, preprocess), tokenizer,
        device="cpu", amp=False, recall_k_list=[1, 5, 10],
    )  # fmt: skip
    metrics = evaluate_retrieval(
        model, tokenizer, preprocess, retrieval_root, ks=(1, 5, 10),
        batch_size=BATCH_SIZE, progress=False,
    )  # fmt: skip

    assert metrics == pytest.approx(expected, rel=0, abs=1e-12)
