"""Backends in one process: parity with open_clip, tiling edge cases, registry and input checks.

Shapes: b batch, D feature dim, K hard negatives per image.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor

from vlp.distributed import (
    BACKENDS,
    GatherBackend,
    LocalBackend,
    RingBackend,
    build_backend,
    ring_clip_loss,
    ring_siglip_loss,
)

B, D, K = 13, 16, 3


def features(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    """Normalised rows of very different raw norms, drawn in float64 and rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    norms = torch.exp(2 * torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64))
    raw = torch.randn(*shape, generator=g, dtype=torch.float64) * norms
    return F.normalize(raw, dim=-1).to(dtype).requires_grad_()


def inputs(dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    return {
        "image": features(B, D, dtype=dtype, seed=1),
        "text": features(B, D, dtype=dtype, seed=2),
        "neg": features(B, K, D, dtype=dtype, seed=3),
        "scale": torch.tensor(37.0, dtype=dtype, requires_grad=True),
        "bias": torch.tensor(-6.5, dtype=dtype, requires_grad=True),
    }


def loss_and_grads(loss_fn, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    for t in tensors.values():
        t.grad = None
    loss = loss_fn(tensors)
    loss.backward()
    return {"loss": loss.detach()} | {k: t.grad for k, t in tensors.items() if t.grad is not None}


def assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor], tol: float = 1e-12):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=tol, atol=tol, msg=key)


def softmax(backend, with_negatives: bool = False):
    def loss(t: dict[str, Tensor]) -> Tensor:
        neg = t["neg"] if with_negatives else None
        return backend.softmax(t["image"], t["text"], t["scale"], neg_text_features=neg)

    return loss


def sigmoid(backend):
    return lambda t: backend.sigmoid(t["image"], t["text"], t["scale"], t["bias"])


def test_local_softmax_matches_open_clip_clip_loss():
    t = inputs()
    expected = loss_and_grads(lambda t: ClipLoss()(t["image"], t["text"], t["scale"]), t)
    assert_same(loss_and_grads(softmax(LocalBackend()), t), expected)


def test_local_sigmoid_matches_open_clip_siglip_loss():
    t = inputs()
    expected = loss_and_grads(
        lambda t: SigLipLoss()(t["image"], t["text"], t["scale"], t["bias"]), t
    )
    assert_same(loss_and_grads(sigmoid(LocalBackend()), t), expected)


def test_local_negatives_are_extra_image_to_text_columns_only():
    t = inputs()
    image, text, neg, scale = t["image"], t["text"], t["neg"].reshape(-1, D), t["scale"]
    labels = torch.arange(B)
    by_hand = (
        F.cross_entropy(scale * image @ torch.cat([text, neg]).T, labels)
        + F.cross_entropy(scale * text @ image.T, labels)
    ) / 2
    assert torch.allclose(softmax(LocalBackend(), with_negatives=True)(t), by_hand, atol=1e-14)


TILE_SIZES = [1, 5, 7, B, 64]  # single rows, non-dividing, exact, larger than the batch


@pytest.mark.parametrize("tile_size", TILE_SIZES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "negatives"])
def test_ring_without_process_group_matches_local_for_any_tile_size(kind: str, tile_size: int):
    def of(backend):
        return sigmoid(backend) if kind == "sigmoid" else softmax(backend, kind == "negatives")

    t = inputs()
    expected = loss_and_grads(of(LocalBackend()), t)
    assert_same(loss_and_grads(of(RingBackend(tile_size=tile_size)), t), expected)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "negatives"])
def test_gather_without_process_group_matches_local(kind: str):
    def of(backend):
        return sigmoid(backend) if kind == "sigmoid" else softmax(backend, kind == "negatives")

    t = inputs()
    assert_same(loss_and_grads(of(GatherBackend()), t), loss_and_grads(of(LocalBackend()), t))


@pytest.mark.parametrize("backend", [LocalBackend(), GatherBackend(), RingBackend(tile_size=4)])
def test_negatives_accept_flat_and_per_image_shapes(backend):
    t = inputs()
    per_image = softmax(backend, with_negatives=True)(t)
    flat = backend.softmax(
        t["image"], t["text"], t["scale"], neg_text_features=t["neg"].reshape(B * K, D)
    )
    torch.testing.assert_close(flat, per_image, rtol=0, atol=0)


def test_ring_float32_matches_float64_reference():
    t32 = inputs(torch.float32)
    t64 = {k: v.detach().double().requires_grad_() for k, v in t32.items()}
    expected = loss_and_grads(softmax(LocalBackend(), with_negatives=True), t64)
    actual = loss_and_grads(softmax(RingBackend(tile_size=5), with_negatives=True), t32)
    assert all(actual[k].dtype == torch.float32 for k in actual)
    assert_same({k: v.double() for k, v in actual.items()}, expected, tol=1e-5)


def test_ring_bfloat16_features_give_float32_loss_and_bfloat16_gradients():
    t = inputs(torch.bfloat16)
    t["scale"] = torch.tensor(20.0, requires_grad=True)
    loss = softmax(RingBackend(tile_size=5), with_negatives=True)(t)
    loss.backward()
    assert loss.dtype == torch.float32
    assert t["image"].grad.dtype == torch.bfloat16 and t["neg"].grad.dtype == torch.bfloat16
    assert t["scale"].grad.dtype == torch.float32


def test_ring_sigmoid_under_no_grad_returns_the_same_loss():
    t = inputs()
    with_grad = sigmoid(RingBackend(tile_size=5))(t)
    with torch.no_grad():
        without_grad = sigmoid(RingBackend(tile_size=5))(t)
    torch.testing.assert_close(without_grad, with_grad.detach(), rtol=0, atol=1e-14)


def test_ring_functions_accept_open_clip_style_scalar_parameters():
    t = inputs()
    scale, bias = t["scale"].reshape(1), t["bias"].reshape(1)
    clip = ring_clip_loss(t["image"], t["text"], scale, neg_text_features=t["neg"], tile_size=4)
    siglip = ring_siglip_loss(t["image"], t["text"], scale, bias, tile_size=4)
    (clip + siglip).backward()
    assert t["scale"].grad.shape == () and t["bias"].grad.shape == ()


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_build_backend_builds_every_registered_name_without_process_group(name: str):
    backend = build_backend(name)
    assert backend.name == ("local" if name == "auto" else name)
    t = inputs()
    assert torch.isfinite(softmax(backend, with_negatives=True)(t))
    assert torch.isfinite(sigmoid(backend)(t))


def test_build_backend_unknown_name_raises_value_error_listing_known_names():
    with pytest.raises(ValueError, match="unknown contrastive backend 'rign'") as error:
        build_backend("rign")
    assert all(name in str(error.value) for name in BACKENDS)


def test_build_backend_passes_tile_size_to_ring():
    assert build_backend("ring", tile_size=77) == RingBackend(tile_size=77)


@pytest.mark.parametrize("tile_size", [0, -3])
def test_ring_tile_size_below_one_raises_value_error(tile_size: int):
    with pytest.raises(ValueError, match="tile_size"):
        build_backend("ring", tile_size=tile_size)
    t = inputs()
    with pytest.raises(ValueError, match="tile_size"):
        ring_clip_loss(t["image"], t["text"], t["scale"], tile_size=tile_size)


@pytest.mark.parametrize("backend", [LocalBackend(), GatherBackend(), RingBackend()])
def test_mismatched_image_and_text_shapes_raise_value_error(backend):
    t = inputs()
    with pytest.raises(ValueError, match="image_features and text_features"):
        backend.softmax(t["image"], t["text"][:-1], t["scale"])


@pytest.mark.parametrize("backend", [LocalBackend(), GatherBackend(), RingBackend()])
def test_negatives_for_another_batch_size_raise_value_error(backend):
    t = inputs()
    with pytest.raises(ValueError, match="neg_text_features"):
        backend.softmax(t["image"], t["text"], t["scale"], neg_text_features=t["neg"][:-1])
    with pytest.raises(ValueError, match="neg_text_features"):
        backend.softmax(
            t["image"], t["text"], t["scale"], neg_text_features=t["neg"].reshape(-1, D)[:-1]
        )


@pytest.mark.parametrize("backend", [LocalBackend(), GatherBackend(), RingBackend()])
def test_non_scalar_logit_scale_raises_value_error(backend):
    t = inputs()
    with pytest.raises(ValueError, match="scalar"):
        backend.sigmoid(t["image"], t["text"], t["scale"].expand(2), t["bias"])


@pytest.mark.parametrize("kind", ["negatives", "sigmoid"])
def test_ring_under_autocast_still_computes_in_the_features_dtype(kind: str):
    def of(backend):
        return sigmoid(backend) if kind == "sigmoid" else softmax(backend, with_negatives=True)

    t32 = inputs(torch.float32)
    expected = loss_and_grads(of(RingBackend(tile_size=5)), t32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = loss_and_grads(of(RingBackend(tile_size=5)), t32)
    assert_same(actual, expected, tol=1e-6)
