"""Half-precision features: the ring's tiles are computed and accumulated in float32.

Shapes: B batch (one process, so the ring is one block), D feature dim, K hard negatives.

The reference is the dense loss in float64 on the very same half-precision values upcast; a
ring that rounded its tile logits to the features' dtype is off by ~3e-3 at B = 256 and scale
100 (and its softmax loss can come out negative), far outside these tolerances.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.distributed import LocalBackend, RingBackend

B, D, K = 256, 64, 2
HALF_DTYPES = [torch.bfloat16, torch.float16]
LOSS_TOLERANCE = 1e-4  # float32 accumulation of logits up to 100: a few 1e-6 per row


def half_inputs(dtype: torch.dtype, *, identical: bool = False) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(7)
    image = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(dtype)
    text = image.clone() if identical else F.normalize(torch.randn(B, D, generator=g), dim=-1)
    neg = F.normalize(torch.randn(B, K, D, generator=g), dim=-1)
    return {
        "image": image.requires_grad_(),
        "text": text.to(dtype).requires_grad_(),
        "neg": neg.to(dtype).requires_grad_(),
        "scale": torch.tensor(100.0, requires_grad=True),
        "bias": torch.tensor(-10.0, requires_grad=True),
    }


def as_float64(t: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().double().requires_grad_() for k, v in t.items()}


def run(backend, kind: str, t: dict[str, Tensor]) -> dict[str, Tensor]:
    if kind == "sigmoid":
        loss = backend.sigmoid(t["image"], t["text"], t["scale"], t["bias"])
    else:
        neg = t["neg"] if kind == "negatives" else None
        loss = backend.softmax(t["image"], t["text"], t["scale"], neg_text_features=neg)
    loss.backward()
    return {"loss": loss.detach()} | {k: v.grad for k, v in t.items() if v.grad is not None}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["softmax", "negatives", "sigmoid"])
def test_ring_with_half_features_matches_float64_loss_on_the_same_values(dtype, kind: str):
    t = half_inputs(dtype)
    expected = run(LocalBackend(), kind, as_float64(t))
    actual = run(RingBackend(tile_size=96), kind, t)
    loss_error = abs(actual["loss"].double() - expected["loss"]).item()
    assert loss_error < LOSS_TOLERANCE, (loss_error, expected["loss"].item())
    for name in ("image", "text", "neg", "scale", "bias"):
        if name not in expected:
            continue
        assert actual[name].dtype == t[name].dtype
        # Gradients come back in the features' dtype: equal up to that dtype's rounding.
        rounded = expected[name].to(t[name].dtype).double()
        eps = torch.finfo(t[name].dtype).eps
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(
            actual[name].double(), rounded, rtol=2 * eps, atol=1e-3 * scale, msg=name
        )


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("tile_size", [7, 96, 1024])
def test_ring_softmax_loss_with_identical_half_features_is_never_negative(dtype, tile_size):
    t = half_inputs(dtype, identical=True)
    loss = run(RingBackend(tile_size=tile_size), "softmax", t)["loss"]
    assert loss.item() >= 0.0
    expected = run(LocalBackend(), "softmax", as_float64(t))["loss"]
    assert abs(loss.item() - expected.item()) < LOSS_TOLERANCE
