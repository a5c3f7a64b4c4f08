"""Zero-shot retrieval on CLIP_benchmark-layout roots (vlp.eval.retrieval).

The model is a lookup table: an image's id is its red value and a caption's id its index in a
vocabulary, so every similarity — and therefore every rank — is chosen by the test.
"""

from __future__ import annotations

import io

import pytest
import torch
import webdataset as wds
from PIL import Image

from vlp.eval import RetrievalEmbeddings, evaluate_retrieval, retrieval_metrics, write_benchmark


class TableModel(torch.nn.Module):
    """Embeddings looked up by id."""

    def __init__(self, image_vectors: list[list[float]], text_vectors: list[list[float]]):
        super().__init__()
        self.image_vectors = torch.tensor(image_vectors)
        self.text_vectors = torch.tensor(text_vectors)

    def encode_image(self, image_ids: torch.Tensor) -> torch.Tensor:
        return self.image_vectors[image_ids]

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        return self.text_vectors[text_ids]


class VocabTokenizer:
    """A caption's token is its index in `vocab`."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.vocab.index(t) for t in texts])


def red_value(image: Image.Image) -> torch.Tensor:
    """Preprocess: the image id stored in the red channel."""
    return torch.tensor(image.getpixel((0, 0))[0])


def solid(image_id: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (image_id, 0, 0))


def png_bytes(image_id: int) -> bytes:
    buffer = io.BytesIO()
    solid(image_id).save(buffer, format="png")
    return buffer.getvalue()


# Images are e0, e1, e2; each caption's vector (before normalisation) sets its ranks.
# Rank of the caption's image among images (text → image) and rank of an image's best own
# caption among captions (image → text) are worked out beside each entry.
CAPTIONS = {
    "t0": ([1.0, 0.0, 0.0], 0),  # image 0 first
    "t1": ([0.1, 0.9, 0.0], 0),  # image 1, then its image 0: second
    "t2": ([0.8, 0.6, 0.0], 1),  # image 0, then its image 1: second
    "t3": ([0.8, 0.5, 0.1], 2),  # images 0, 1, then its image 2: third
    "t4": ([0.0, 0.0, 1.0], 2),  # image 2 first
}
# image → text: image 0 scores t0 highest (own); image 1 scores t1 (0.99) above its own t2
# (0.6): second; image 2 scores t4 highest (own).
EXPECTED = {
    "image_retrieval_recall@1": 2 / 5,
    "image_retrieval_recall@2": 4 / 5,
    "image_retrieval_recall@3": 5 / 5,
    "text_retrieval_recall@1": 2 / 3,
    "text_retrieval_recall@2": 3 / 3,
    "text_retrieval_recall@3": 3 / 3,
}


def retrieval_case(root, num_shards: int = 1):
    captions_of = [[name for name, (_, image) in CAPTIONS.items() if image == i] for i in range(3)]
    samples = [(solid(i), captions) for i, captions in enumerate(captions_of)]
    write_benchmark(root, samples, dataset_type="retrieval", num_shards=num_shards)
    model = TableModel(torch.eye(3).tolist(), [vector for vector, _ in CAPTIONS.values()])
    return model, VocabTokenizer(list(CAPTIONS))


@pytest.mark.parametrize(("num_shards", "batch_size"), [(1, 64), (2, 2), (3, 1)])
def test_recalls_match_hand_ranked_captions(tmp_path, num_shards, batch_size):
    model, tokenizer = retrieval_case(tmp_path / "bench", num_shards)

    metrics = evaluate_retrieval(
        model, tokenizer, red_value, tmp_path / "bench",
        ks=(1, 2, 3), batch_size=batch_size, progress=False,
    )  # fmt: skip

    assert metrics == pytest.approx(EXPECTED)


def test_default_ks_beyond_the_candidates_retrieve_everything(tmp_path):
    model, tokenizer = retrieval_case(tmp_path / "bench")

    metrics = evaluate_retrieval(model, tokenizer, red_value, tmp_path / "bench", progress=False)

    assert set(metrics) == {
        f"{direction}_retrieval_recall@{k}" for direction in ("image", "text") for k in (1, 5, 10)
    }
    assert metrics["image_retrieval_recall@1"] == pytest.approx(
        EXPECTED["image_retrieval_recall@1"]
    )
    assert metrics["image_retrieval_recall@5"] == 1.0  # only three images to retrieve
    assert metrics["text_retrieval_recall@10"] == 1.0  # only five captions to retrieve


def test_image_without_captions_counts_as_a_text_retrieval_miss(tmp_path):
    write_benchmark(
        tmp_path / "bench", [(solid(0), []), (solid(1), ["a"])], dataset_type="retrieval"
    )
    model = TableModel(torch.eye(2).tolist(), [[0.0, 1.0]])

    metrics = evaluate_retrieval(
        model, VocabTokenizer(["a"]), red_value, tmp_path / "bench", ks=(1,), progress=False
    )

    assert metrics["image_retrieval_recall@1"] == 1.0  # "a" finds image 1
    assert metrics["text_retrieval_recall@1"] == 1 / 2  # image 0 has nothing to find


def test_tied_scores_are_ranked_as_torch_topk_ranks_them():
    embeddings = RetrievalEmbeddings(
        image_features=torch.tensor([[1.0, 0.0]] * 4),  # four identical images
        text_features=torch.tensor([[1.0, 0.0]] * 4),
        text_to_image=torch.arange(4),
    )
    first = torch.ones(4, 4).topk(1, dim=1).indices.view(-1)

    metrics = retrieval_metrics(embeddings, ks=(1,))

    assert metrics["image_retrieval_recall@1"] == (first == torch.arange(4)).sum().item() / 4


def test_nonpositive_k_raises():
    embeddings = RetrievalEmbeddings(torch.eye(2), torch.eye(2), torch.arange(2))

    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(embeddings, ks=(0, 1))


def test_sample_without_captions_member_raises_naming_its_key(tmp_path):
    model, tokenizer = retrieval_case(tmp_path / "bench")
    with wds.TarWriter(str(tmp_path / "bench" / "test" / "0.tar")) as writer:
        writer.write({"__key__": "lonely", "png": png_bytes(0)})

    with pytest.raises(ValueError, match=r"'lonely'.*no 'txt' member"):
        evaluate_retrieval(model, tokenizer, red_value, tmp_path / "bench", progress=False)


def test_root_without_any_caption_raises(tmp_path):
    write_benchmark(tmp_path / "bench", [(solid(0), [])], dataset_type="retrieval")

    with pytest.raises(ValueError, match="no captions"):
        evaluate_retrieval(
            TableModel([[1.0]], []), VocabTokenizer([]), red_value, tmp_path / "bench",
            progress=False,
        )  # fmt: skip


def test_classification_root_is_rejected(tmp_path):
    write_benchmark(tmp_path / "bench", [(solid(0), 0)], classnames=["a"], templates=["{c}"])

    with pytest.raises(ValueError, match="evaluate_zeroshot"):
        evaluate_retrieval(
            TableModel([], []), VocabTokenizer([]), red_value, tmp_path / "bench", progress=False
        )
