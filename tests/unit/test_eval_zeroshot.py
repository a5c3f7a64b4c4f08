"""Zero-shot classification on CLIP_benchmark-layout roots (vlp.eval.zeroshot, benchmark_data).

Fixtures are written by hand with webdataset.TarWriter in the official layout. The model is a
lookup table: an image's id is its red value and a prompt's id its index in a vocabulary, so
every embedding — and therefore every right answer — is chosen by the test.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from vlp.eval import (
    classification_metrics,
    evaluate_zeroshot,
    iter_batches,
    predict_zeroshot,
    read_benchmark,
    write_benchmark,
    zero_shot_classifier,
)
from vlp.eval.benchmark_data import read_templates

E = torch.eye(6).tolist()  # orthonormal directions e0..e5


class TableModel(torch.nn.Module):
    """Embeddings looked up by id; records the training flag it was called with."""

    def __init__(self, image_vectors: list[list[float]], text_vectors: list[list[float]]):
        super().__init__()
        self.image_vectors = torch.tensor(image_vectors)
        self.text_vectors = torch.tensor(text_vectors)
        self.training_flags_seen: set[bool] = set()

    def encode_image(self, image_ids: torch.Tensor) -> torch.Tensor:
        self.training_flags_seen.add(self.training)
        return self.image_vectors[image_ids]

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        return self.text_vectors[text_ids]


class VocabTokenizer:
    """A prompt's token is its index in `vocab`; an unknown prompt is a test failure."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.vocab.index(t) for t in texts])


def red_value(image: Image.Image) -> torch.Tensor:
    """Preprocess: the image id stored in the red channel."""
    return torch.tensor(image.getpixel((0, 0))[0])


def image_bytes(image_id: int, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (image_id, 0, 0)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_root(
    root: Path,
    members: list[dict[str, bytes]],
    *,
    files: dict[str, str] | None = None,
    num_shards: int = 1,
) -> Path:
    """A benchmark root in the official layout: metadata `files` and `members` cut into shards."""
    (root / "test").mkdir(parents=True)
    for name, text in (files or {}).items():
        (root / name).write_text(text)
    (root / "test" / "nshards.txt").write_text(f"{num_shards}\n")
    per_shard = math.ceil(len(members) / num_shards) if members else 0
    for shard in range(num_shards):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as writer:
            for i, member in enumerate(members[shard * per_shard : (shard + 1) * per_shard]):
                writer.write({"__key__": f"{shard}_{i:04d}", **member})
    return root


def classification_root(
    root: Path,
    targets: list[int],
    classnames: list[str],
    templates: tuple[str, ...] = ("{c}",),
    num_shards: int = 1,
) -> Path:
    """Sample i is image id i with class `targets[i]`."""
    members = [{"png": image_bytes(i), "cls": str(t).encode()} for i, t in enumerate(targets)]
    files = {
        "classnames.txt": "\n".join(classnames) + "\n",
        "zeroshot_classification_templates.txt": "\n".join(templates) + "\n",
    }
    return write_root(root, members, files=files, num_shards=num_shards)


# Three classes, one template "{c}" with orthonormal class prompts; five of six images right,
# but the only "dog" is seen as a cat, so the mean per-class recall is well below accuracy.
IMBALANCED_CLASSES = ["cat", "dog", "fox"]
IMBALANCED_TARGETS = [0, 0, 0, 0, 1, 2]
IMBALANCED_IMAGES = [E[0][:3]] * 5 + [E[2][:3]]
IMBALANCED_PREDICTIONS = [0, 0, 0, 0, 0, 2]


@pytest.fixture
def imbalanced(tmp_path):
    root = classification_root(tmp_path / "bench", IMBALANCED_TARGETS, IMBALANCED_CLASSES)
    model = TableModel(IMBALANCED_IMAGES, [v[:3] for v in E[:3]])
    return root, model, VocabTokenizer(IMBALANCED_CLASSES)


def test_classifier_averages_normalised_template_embeddings():
    vocab = ["a cat.", "the cat!", "a dog.", "the dog!"]
    vectors = [[3.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 7.0]]
    model, tokenizer = TableModel([], vectors), VocabTokenizer(vocab)

    classifier = zero_shot_classifier(
        model, tokenizer, ["cat", "dog"], ["a {c}.", "the {c}!"], device="cpu", batch_size=3
    )

    cat = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)  # not the direction of [3, 5, 0]
    dog = torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(classifier, torch.stack([cat, dog], dim=1))


@pytest.mark.parametrize(
    ("num_shards", "batch_size", "num_workers"), [(1, 64, 0), (2, 4, 0), (3, 1, 2)]
)
def test_metrics_match_hand_counts_on_imbalanced_classes(
    tmp_path, num_shards, batch_size, num_workers
):
    root = classification_root(
        tmp_path / "bench", IMBALANCED_TARGETS, IMBALANCED_CLASSES, num_shards=num_shards
    )
    model = TableModel(IMBALANCED_IMAGES, [v[:3] for v in E[:3]])

    metrics = evaluate_zeroshot(
        model, VocabTokenizer(IMBALANCED_CLASSES), red_value, root,
        batch_size=batch_size, progress=False, num_workers=num_workers,
    )  # fmt: skip

    assert metrics["acc1"] == pytest.approx(5 / 6)
    assert metrics["mean_per_class_recall"] == pytest.approx((4 / 4 + 0 / 1 + 1 / 1) / 3)
    assert math.isnan(metrics["acc5"])  # fewer than five classes: NaN, as CLIP_benchmark reports


def test_top5_accuracy_counts_targets_ranked_within_five_of_six_classes(tmp_path):
    classnames = [f"class{i}" for i in range(6)]
    root = classification_root(tmp_path / "bench", [0, 1, 5], classnames)
    images = [
        [0.1, 0.9, 0.5, 0.0, 0.0, 0.0],  # target 0 ranked third
        E[1],  # target 1 ranked first
        [1.0, 2.0, 3.0, 4.0, 5.0, 0.0],  # target 5 ranked last
    ]
    model = TableModel(images, E)

    metrics = evaluate_zeroshot(model, VocabTokenizer(classnames), red_value, root, progress=False)

    assert metrics["acc1"] == pytest.approx(1 / 3)
    assert metrics["acc5"] == pytest.approx(2 / 3)
    assert metrics["mean_per_class_recall"] == pytest.approx((0 + 1 + 0) / 3)


def test_tied_logits_are_ranked_as_torch_topk_ranks_them():
    logits = torch.zeros(6, 6)  # every class tied for every sample
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    top = logits.topk(5, dim=1).indices

    metrics = classification_metrics(logits, targets)

    assert metrics["acc1"] == (top[:, 0] == targets).sum().item() / 6
    assert metrics["acc5"] == (top == targets[:, None]).any(dim=1).sum().item() / 6


def test_predictions_hold_logits_and_targets_per_sample(imbalanced):
    root, model, tokenizer = imbalanced

    predictions = predict_zeroshot(model, tokenizer, red_value, root, progress=False)

    assert predictions.targets.tolist() == IMBALANCED_TARGETS
    assert predictions.predictions.tolist() == IMBALANCED_PREDICTIONS
    assert predictions.classnames == IMBALANCED_CLASSES
    assert predictions.logits.shape == (6, 3)
    assert predictions.logits.max().item() == pytest.approx(100.0)  # 100 * cosine


def test_selected_classes_score_only_their_samples_against_all_classes(imbalanced):
    root, model, tokenizer = imbalanced
    predictions = predict_zeroshot(model, tokenizer, red_value, root, progress=False)

    dog = predictions.select_classes(["dog"])
    cat_and_fox = predictions.select_classes([0, "fox"])

    assert len(dog.targets) == 1 and dog.metrics()["acc1"] == 0.0
    assert len(cat_and_fox.targets) == 5 and cat_and_fox.metrics()["acc1"] == 1.0


def test_selecting_an_unknown_class_raises(imbalanced):
    root, model, tokenizer = imbalanced
    predictions = predict_zeroshot(model, tokenizer, red_value, root, progress=False)

    with pytest.raises(ValueError, match="wolf"):
        predictions.select_classes(["wolf"])


def test_model_is_encoded_in_eval_mode_and_left_in_training_mode(imbalanced):
    root, model, tokenizer = imbalanced
    model.train()

    evaluate_zeroshot(model, tokenizer, red_value, root, progress=False)

    assert model.training_flags_seen == {False}
    assert model.training


def test_templates_and_classnames_files_replace_the_roots(imbalanced, tmp_path):
    root, _, _ = imbalanced
    (tmp_path / "names.txt").write_text("tabby\npuppy\nkit\n")
    (tmp_path / "prompts.txt").write_text("a photo of a {c}.\n")
    prompts = ["a photo of a tabby.", "a photo of a puppy.", "a photo of a kit."]
    model = TableModel(IMBALANCED_IMAGES, [v[:3] for v in E[:3]])

    metrics = evaluate_zeroshot(
        model, VocabTokenizer(prompts), red_value, root, progress=False,
        classnames_file=tmp_path / "names.txt", templates_file=tmp_path / "prompts.txt",
    )  # fmt: skip

    assert metrics["acc1"] == pytest.approx(5 / 6)


def test_shipped_imagenet_templates_are_the_80_clip_prompts():
    path = Path(__file__).parents[2] / "eval" / "templates" / "imagenet_templates.txt"

    templates = read_templates(path)

    assert len(templates) == 80 and len(set(templates)) == 80
    assert all("{c}" in t for t in templates)
    assert templates[0] == "a bad photo of a {c}." and templates[-1] == "a tattoo of the {c}."


@pytest.mark.parametrize("extension", ["webp", "png", "jpg", "jpeg"])
def test_every_clip_benchmark_image_extension_is_read(tmp_path, extension):
    fmt = "jpeg" if extension == "jpg" else extension
    files = {"classnames.txt": "a\nb\n", "zeroshot_classification_templates.txt": "{c}\n"}
    members = [{extension: image_bytes(0, fmt), "cls": b"1"}]
    root = write_root(tmp_path / "bench", members, files=files)

    batches = list(iter_batches(read_benchmark(root), red_value, batch_size=8))

    assert len(batches) == 1 and batches[0][1].tolist() == [1]


def test_written_benchmark_reads_back_in_order(tmp_path):
    samples = [(Image.new("RGB", (4, 4), (i, 0, 0)), i % 2) for i in range(5)]
    root = write_benchmark(
        tmp_path / "bench", samples, classnames=["a", "b"], templates=["{c}"], num_shards=2
    )

    batches = list(iter_batches(read_benchmark(root), red_value, batch_size=2))

    assert sorted(p.name for p in (root / "test").iterdir()) == ["0.tar", "1.tar", "nshards.txt"]
    assert torch.cat([images for images, _ in batches]).tolist() == [0, 1, 2, 3, 4]
    assert torch.cat([targets for _, targets in batches]).tolist() == [0, 1, 0, 1, 0]


# --- bad input: a ValueError that names the root, file, sample or member ------------------------

GOOD_FILES = {"classnames.txt": "a\nb\n", "zeroshot_classification_templates.txt": "{c}\n"}


def test_root_without_nshards_raises_naming_it(tmp_path):
    root = write_root(tmp_path / "bench", [], files=GOOD_FILES)
    (root / "test" / "nshards.txt").unlink()

    with pytest.raises(ValueError, match=r"bench has no test/nshards\.txt"):
        read_benchmark(root)


def test_root_that_does_not_exist_raises_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        read_benchmark(tmp_path / "nowhere")


def test_shard_listed_but_missing_raises_naming_it(tmp_path):
    root = write_root(tmp_path / "bench", [], files=GOOD_FILES)
    (root / "test" / "nshards.txt").write_text("2\n")

    with pytest.raises(ValueError, match=r"1\.tar"):
        read_benchmark(root)


def test_nshards_that_is_not_a_positive_count_raises(tmp_path):
    root = write_root(tmp_path / "bench", [], files=GOOD_FILES)
    (root / "test" / "nshards.txt").write_text("two\n")

    with pytest.raises(ValueError, match="nshards.txt"):
        read_benchmark(root)


@pytest.mark.parametrize("missing", ["classnames.txt", "zeroshot_classification_templates.txt"])
def test_classification_root_without_metadata_file_raises_naming_it(tmp_path, missing):
    files = {name: text for name, text in GOOD_FILES.items() if name != missing}
    root = write_root(tmp_path / "bench", [], files=files)

    with pytest.raises(ValueError, match=missing):
        read_benchmark(root)


def test_template_with_a_positional_field_raises_naming_its_line(tmp_path):
    files = {**GOOD_FILES, "zeroshot_classification_templates.txt": "{c}\na photo of a {}.\n"}
    root = write_root(tmp_path / "bench", [], files=files)

    with pytest.raises(ValueError, match="line 2"):
        read_benchmark(root)


def test_blank_line_between_classnames_raises(tmp_path):
    files = {**GOOD_FILES, "classnames.txt": "a\n\nb\n"}
    root = write_root(tmp_path / "bench", [], files=files)

    with pytest.raises(ValueError, match="classnames.txt line 2 is empty"):
        read_benchmark(root)


def test_unsupported_dataset_type_raises_naming_it(tmp_path):
    root = write_root(
        tmp_path / "bench", [], files={**GOOD_FILES, "dataset_type.txt": "multilabel"}
    )

    with pytest.raises(ValueError, match="multilabel"):
        read_benchmark(root)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ({"cls": b"0"}, "has no image member"),
        ({"png": image_bytes(0)}, "has no 'cls' member"),
        ({"png": image_bytes(0), "cls": b"2"}, "class index 2 is outside the 2 class names"),
        ({"png": image_bytes(0), "cls": b"dog"}, "'dog', not an integer"),
        ({"png": b"not an image", "cls": b"0"}, "cannot decode image"),
    ],
)
def test_bad_sample_raises_naming_its_key_and_fault(tmp_path, member, message):
    root = write_root(tmp_path / "bench", [member], files=GOOD_FILES)
    model = TableModel([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])

    with pytest.raises(ValueError, match=message) as raised:
        evaluate_zeroshot(model, VocabTokenizer(["a", "b"]), red_value, root, progress=False)
    assert "'0_0000'" in str(raised.value)


def test_shards_without_samples_raise(tmp_path):
    root = write_root(tmp_path / "bench", [], files=GOOD_FILES)
    model = TableModel([], [[1.0, 0.0], [0.0, 1.0]])

    with pytest.raises(ValueError, match="no samples"):
        evaluate_zeroshot(model, VocabTokenizer(["a", "b"]), red_value, root, progress=False)


def test_retrieval_root_is_rejected(tmp_path):
    members = [{"png": image_bytes(0), "txt": b"a caption"}]
    root = write_root(tmp_path / "bench", members, files={"dataset_type.txt": "retrieval\n"})

    with pytest.raises(ValueError, match="evaluate_retrieval"):
        evaluate_zeroshot(TableModel([], []), VocabTokenizer([]), red_value, root, progress=False)
