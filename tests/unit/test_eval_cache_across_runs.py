"""What outlives one suite run (vlp.eval.cache): decoded images, kept per transform within a
memory limit, and the caption features of a locked text tower, kept while its weights hash the
same. A suite run again in the same process (a training run's periodic evaluations) reads no
image and, with a locked and unchanged text tower, encodes no caption, and scores the same."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
import yaml
from PIL import Image

from vlp.eval.benchmark_data import read_benchmark, write_benchmark
from vlp.eval.cache import (
    IMAGE_CACHE_ENV,
    decoded_bytes,
    image_cache_limit,
    suite_cache,
    text_tower_fingerprint,
)
from vlp.eval.embedding import ImageRef, embed_images, root_embeddings
from vlp.eval.runner import evaluate_suite
from vlp.eval.suite import load_suite
from vlp.eval.zeroshot import encode_texts
from vlp.models import build_model
from vlp.models.locking import lock_towers

CAPTIONS = ["a red circle above a blue square", "two green stars left of a cross",
            "a small yellow triangle", "the big circle is below the small star",
            "a blue square right of a red cross", "three shapes on a white background"]
COLOURS = [(40 * i, 200 - 30 * i, 7 * i) for i in range(len(CAPTIONS))]


class CountingPreprocess:
    """An image's top-left colour as a (3,) tensor (12 bytes); every call is counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, image: Image.Image) -> torch.Tensor:
        self.calls += 1
        return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32) / 255.0


class ColourModel(torch.nn.Module):
    """Images embed as their colour, texts as their token ids."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t) % 7 + 1.0, t.count(" ") + 1.0, ord(t[0]) / 50] for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images + 0.1


@pytest.fixture
def data(tmp_path):
    """A retrieval root (two shards), a classification root and a SugarCrepe folder of files."""
    retrieval = write_benchmark(
        tmp_path / "retrieval",
        [(Image.new("RGB", (4, 4), c), [CAPTIONS[i], CAPTIONS[(i + 1) % len(CAPTIONS)]])
         for i, c in enumerate(COLOURS)],
        dataset_type="retrieval", num_shards=2)
    zeroshot = write_benchmark(
        tmp_path / "zeroshot", [(Image.new("RGB", (4, 4), c), i % 3) for i, c in enumerate(COLOURS)],
        classnames=["circle", "square", "star"], templates=["a {c}", "a photo of a {c}"])
    sugarcrepe = tmp_path / "sugarcrepe"
    (sugarcrepe / "images").mkdir(parents=True)
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (4, 4), c).save(sugarcrepe / "images" / f"{i}.png")
    items = {str(i): {"filename": f"{i}.png", "caption": CAPTIONS[i],
                      "negative_caption": CAPTIONS[(i + 2) % len(CAPTIONS)]}
             for i in range(len(CAPTIONS))}
    (sugarcrepe / "replace_obj.json").write_text(json.dumps(items))
    return {"retrieval": retrieval, "zeroshot": zeroshot, "sugarcrepe": sugarcrepe}


@pytest.fixture
def suite(tmp_path, data):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "runs", "batch_size": 4, "benchmarks": [
        {"name": "zeroshot", "task": "zeroshot", "data": str(data["zeroshot"])},
        {"name": "retrieval", "task": "retrieval", "data": str(data["retrieval"])},
        {"name": "sugarcrepe", "task": "sugarcrepe", "data": str(data["sugarcrepe"]),
         "options": {"subsets": ["replace_obj"]}}]}))
    return load_suite(path)


def run(model, tokenizer, preprocess, suite, out):
    """`{benchmark/metric: value}` of one suite run."""
    result = evaluate_suite(model, tokenizer, preprocess, suite, out, progress=False,
                            write_files=False)
    return result.flat_metrics(prefix="")


def same(metrics):
    """Equal to `metrics` exactly, NaN (acc5 of fewer than 5 classes) included."""
    return pytest.approx(metrics, rel=0, abs=0, nan_ok=True)


# Decoded images


def test_a_suite_run_again_with_the_same_transform_decodes_no_image(tmp_path, suite):
    model, preprocess = ColourModel(), CountingPreprocess()

    first = run(model, model.tokenizer, preprocess, suite, tmp_path / "1")
    decoded = preprocess.calls
    second = run(model, model.tokenizer, preprocess, suite, tmp_path / "2")

    # zeroshot and retrieval roots, SugarCrepe's files: each image decoded once in the first run
    assert decoded == 3 * len(COLOURS)
    assert preprocess.calls == decoded
    assert second == same(first)


def test_another_transform_decodes_the_images_again(tmp_path, suite):
    model, preprocess, other = ColourModel(), CountingPreprocess(), CountingPreprocess()

    first = run(model, model.tokenizer, preprocess, suite, tmp_path / "1")
    second = run(model, model.tokenizer, other, suite, tmp_path / "2")

    assert other.calls == preprocess.calls == 3 * len(COLOURS)
    assert second == same(first)


def test_images_decoded_by_loader_workers_are_kept_in_the_main_process(data):
    model, preprocess = ColourModel(), CountingPreprocess()
    refs = [ImageRef(data["sugarcrepe"] / "images" / f"{i}.png") for i in range(len(COLOURS))]
    benchmark = read_benchmark(data["retrieval"])
    in_workers = (embed_images(model, preprocess, refs, device="cpu", batch_size=4, num_workers=2),
                  root_embeddings(model, preprocess, benchmark, device="cpu", batch_size=4,
                                  num_workers=2))
    assert preprocess.calls == 0  # decoded in the workers, whose copies of it counted

    again = (embed_images(model, preprocess, refs, device="cpu", batch_size=4),
             root_embeddings(model, preprocess, benchmark, device="cpu", batch_size=4))

    assert preprocess.calls == 0
    assert torch.equal(again[0], in_workers[0])
    assert torch.equal(again[1][0], in_workers[1][0])
    assert again[1][1] == in_workers[1][1]


def test_a_rewritten_image_file_is_read_again(data):
    model, preprocess = ColourModel(), CountingPreprocess()
    path = data["sugarcrepe"] / "images" / "0.png"
    refs = [ImageRef(path), ImageRef(data["sugarcrepe"] / "images" / "1.png")]
    before = embed_images(model, preprocess, refs, device="cpu", batch_size=4)

    Image.new("RGB", (5, 5), (255, 0, 0)).save(path)  # new content, new size
    after = embed_images(model, preprocess, refs, device="cpu", batch_size=4)

    assert preprocess.calls == 3  # both files, then the rewritten one only
    assert torch.equal(after[1], before[1])
    assert torch.allclose(after[0], torch.nn.functional.normalize(
        torch.tensor([1.1, 0.1, 0.1]), dim=0))


def test_images_beyond_the_limit_are_decoded_each_time_instead_of_kept(monkeypatch, data):
    model, preprocess = ColourModel(), CountingPreprocess()
    refs = [ImageRef(data["sugarcrepe"] / "images" / f"{i}.png") for i in range(len(COLOURS))]
    kept_elsewhere = decoded_bytes()
    image_bytes = 3 * 4  # one (3,) float32 tensor
    monkeypatch.setenv(IMAGE_CACHE_ENV, str((kept_elsewhere + 2 * image_bytes) / 2**20))

    first = embed_images(model, preprocess, refs, device="cpu", batch_size=4)
    assert decoded_bytes() == kept_elsewhere + 2 * image_bytes <= image_cache_limit()
    second = embed_images(model, preprocess, refs, device="cpu", batch_size=4)

    assert preprocess.calls == 2 * len(refs) - 2  # two images kept, the others read twice
    assert torch.equal(second, first)


def test_the_default_limit_is_768_mib_and_zero_keeps_nothing(monkeypatch, data):
    monkeypatch.delenv(IMAGE_CACHE_ENV, raising=False)
    assert image_cache_limit() == 768 * 2**20
    monkeypatch.setenv(IMAGE_CACHE_ENV, "0")
    model, preprocess = ColourModel(), CountingPreprocess()
    refs = [ImageRef(data["sugarcrepe"] / "images" / "0.png")]

    for _ in range(2):
        embed_images(model, preprocess, refs, device="cpu", batch_size=4)

    assert preprocess.calls == 2
    monkeypatch.setenv(IMAGE_CACHE_ENV, "lots")
    with pytest.raises(ValueError, match=IMAGE_CACHE_ENV):
        image_cache_limit()


def test_decoded_images_are_released_with_their_transform(tmp_path, suite):
    model, preprocess = ColourModel(), CountingPreprocess()
    kept_before = decoded_bytes()
    run(model, model.tokenizer, preprocess, suite, tmp_path / "1")
    assert decoded_bytes() > kept_before

    alive = weakref.ref(preprocess)
    del preprocess
    gc.collect()

    assert alive() is None
    assert decoded_bytes() == kept_before


# Caption features of a locked text tower


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("vlp-tiny")


class Forwards:
    """Counts the forward calls of `module` (by default a CLIP's text transformer)."""

    def __init__(self, model, module=None):
        self.calls = 0
        (module or model.transformer).register_forward_hook(self.count)

    def count(self, module, inputs, output):
        self.calls += 1


@pytest.fixture
def locked(tiny):
    model = copy.deepcopy(tiny.model)
    lock_towers(model, text=True)
    return model


def test_a_locked_unchanged_text_tower_is_not_run_again_and_scores_the_same(
        tmp_path, suite, tiny, locked):
    forwards, image_forwards = Forwards(locked), Forwards(locked, locked.visual)

    run(locked, tiny.tokenizer, tiny.preprocess_val, suite, tmp_path / "1")
    calls, image_calls = forwards.calls, image_forwards.calls
    locked.visual.conv1.weight.data.mul_(1.5)  # training moves the image tower only
    second = run(locked, tiny.tokenizer, tiny.preprocess_val, suite, tmp_path / "2")

    assert calls > 0
    assert forwards.calls == calls  # no caption encoded in the second run
    assert image_forwards.calls == 2 * image_calls  # but every image, with the new weights
    fresh = copy.deepcopy(locked)  # the same weights, nothing kept for this model
    assert run(fresh, tiny.tokenizer, tiny.preprocess_val, suite, tmp_path / "3") == same(second)


def test_changed_text_weights_are_never_served_stale_features(tiny, locked):
    forwards = Forwards(locked)
    with suite_cache(locked, tiny.tokenizer, "cpu"):
        before = encode_texts(locked, tiny.tokenizer, CAPTIONS, device="cpu")

    # through .data, which autograd's version counter does not see
    locked.ln_final.bias.data.add_(0.5)
    with suite_cache(locked, tiny.tokenizer, "cpu") as cache:
        features = encode_texts(locked, tiny.tokenizer, CAPTIONS, device="cpu")

    assert cache.reused_texts == 0
    assert forwards.calls == 2
    assert not torch.allclose(features, before)
    fresh = copy.deepcopy(locked)
    with suite_cache():
        assert torch.equal(features, encode_texts(fresh, tiny.tokenizer, CAPTIONS, device="cpu"))


def test_a_trainable_text_tower_is_run_again_each_time(tiny):
    model = copy.deepcopy(tiny.model)
    forwards = Forwards(model)

    runs = []
    for _ in range(2):
        with suite_cache(model, tiny.tokenizer, "cpu") as cache:
            runs.append(encode_texts(model, tiny.tokenizer, CAPTIONS, device="cpu"))

    assert cache.reused_texts == 0
    assert forwards.calls == 2
    assert torch.equal(runs[1], runs[0])
    assert text_tower_fingerprint(model) is None


def test_partly_unlocked_text_tower_is_not_fingerprinted(tiny):
    model = copy.deepcopy(tiny.model)
    lock_towers(model, text=True, text_unlocked_layers=1)

    assert text_tower_fingerprint(model) is None


def test_fingerprint_sees_any_change_of_the_locked_weights_and_nothing_else(locked):
    before = text_tower_fingerprint(locked)

    locked.visual.conv1.weight.data.add_(1.0)
    locked.logit_scale.data.add_(1.0)
    assert text_tower_fingerprint(locked) == before

    locked.token_embedding.weight.data[123, 4] += 1e-3
    assert text_tower_fingerprint(locked) != before


def test_features_are_kept_per_tokenizer_and_device(locked, tiny):
    forwards = Forwards(locked)
    with suite_cache(locked, tiny.tokenizer, "cpu"):
        encode_texts(locked, tiny.tokenizer, CAPTIONS, device="cpu")

    other_tokenizer = copy.deepcopy(tiny.tokenizer)
    with suite_cache(locked, other_tokenizer, "cpu") as cache:
        encode_texts(locked, other_tokenizer, CAPTIONS, device="cpu")

    assert cache.reused_texts == 0
    assert forwards.calls == 2
    with suite_cache(locked, other_tokenizer, "cpu") as cache:
        encode_texts(locked, other_tokenizer, CAPTIONS, device="cpu")
    assert cache.reused_texts == len(CAPTIONS)
    assert forwards.calls == 2
