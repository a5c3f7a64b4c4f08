"""Intra-modal and mixed-modality retrieval (vlp.eval.modality_retrieval) on a hand-worked set:
two images, three captions in two dimensions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlp.eval.modality_retrieval import modality_retrieval_metrics
from vlp.eval.retrieval import RetrievalEmbeddings


@pytest.fixture
def embeddings():
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    texts = F.normalize(torch.tensor([[0.9, 0.1],    # t0, of image 0
                                      [0.3, 0.7],    # t1, of image 0, but nearer image 1's side
                                      [0.1, 0.9]]),  # t2, of image 1
                        dim=1)
    captions = ("red circle", "a red circle", "Red  circle")  # t2 repeats t0's text
    return RetrievalEmbeddings(images, texts, torch.tensor([0, 0, 1]), captions)


def test_hand_worked_intra_and_mixed_recalls(embeddings):
    metrics = modality_retrieval_metrics(embeddings, embeddings.captions, ks=(1, 2))

    # t0's nearest other caption is t1 (hit), t1's is t2 (miss); t2 has no sibling: left out
    assert metrics["text_to_text_recall@1"] == 0.5
    assert metrics["text_to_text_recall@2"] == 1.0
    # both images carry "red circle" (t0, t2 after lower-casing): each is the other's twin
    assert metrics["image_to_image_recall@1"] == 1.0
    # pool [I0, I1, t0, t1, t2]: t0 → I0 (hit), t1 → t2 (miss), t2 → I1 (hit)
    assert metrics["mixed_text_query_recall@1"] == pytest.approx(2 / 3)
    assert metrics["mixed_text_query_top1_is_text"] == pytest.approx(1 / 3)
    # I0 → t0 (hit), I1 → t2 (hit); neither image's nearest item is an image
    assert metrics["mixed_image_query_recall@1"] == 1.0
    assert metrics["mixed_image_query_top1_is_image"] == 0.0


def test_a_gap_between_the_modalities_shows_in_the_mixed_pool(embeddings):
    shift = torch.tensor([0.0, 0.0, 5.0])  # a third axis separates images from captions
    gapped = RetrievalEmbeddings(
        F.normalize(torch.cat([embeddings.image_features, torch.zeros(2, 1)], 1) + shift, dim=1),
        F.normalize(torch.cat([embeddings.text_features, torch.zeros(3, 1)], 1) - shift, dim=1),
        embeddings.text_to_image, embeddings.captions)

    metrics = modality_retrieval_metrics(gapped, gapped.captions, ks=(1,))

    assert metrics["mixed_image_query_top1_is_image"] == 1.0
    assert metrics["mixed_text_query_top1_is_text"] == 1.0
    assert metrics["mixed_image_query_recall@1"] == 0.0


def test_metrics_without_a_relevant_item_are_left_out():
    one = RetrievalEmbeddings(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), ("a", "b"))

    metrics = modality_retrieval_metrics(one, one.captions, ks=(1,))

    assert "text_to_text_recall@1" not in metrics  # one caption per image
    assert "image_to_image_recall@1" not in metrics  # no shared caption
    assert metrics["mixed_image_query_recall@1"] == 1.0
