"""Every backend, on 1–4 gloo ranks, reproduces the global-batch loss and its gradients.

The reference is open_clip's `ClipLoss` / `SigLipLoss` (and NegCLIP and the leave-one-out
softmax of DCL / InfoLOOB written out by hand from their definitions) on the whole global batch
in one process, in float64. Ranks emulate DDP: parameter gradients are
averaged over ranks; raw feature gradients are W × the global-batch gradient of the rank's rows.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor

from tests.distributed.harness import (
    DTYPES,
    KINDS,
    LOCAL_BATCH,
    PARAMETERS,
    WORLD_SIZES,
    Case,
    backends_for,
    make_inputs,
    towers,
    world_results,
)

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}

CASES = [
    (world_size, Case(backend, kind, dtype))
    for world_size in WORLD_SIZES
    for backend in backends_for(world_size)
    for kind in KINDS
    for dtype in DTYPES
]
IDS = [f"W{w}-{case.key}" for w, case in CASES]


def negclip_loss(image: Tensor, text: Tensor, neg: Tensor, scale: Tensor) -> Tensor:
    """NegCLIP: negatives are extra text columns of the image->text softmax only."""
    labels = torch.arange(image.shape[0])
    columns = torch.cat([text, neg.reshape(-1, neg.shape[-1])])
    image_to_text = F.cross_entropy(scale * image @ columns.T, labels)
    text_to_image = F.cross_entropy(scale * text @ image.T, labels)
    return (image_to_text + text_to_image) / 2


def leave_one_out_loss(image: Tensor, text: Tensor, scale: Tensor, neg: Tensor | None) -> Tensor:
    """DCL / InfoLOOB from the papers' definition, row by row: −s_ii + log Σ_{j≠i} exp(s_ij) in
    each direction (hard negatives are among the j ≠ i of the image->text rows), halved."""
    logits = scale * image @ text.T
    extra = None if neg is None else scale * image @ neg.reshape(-1, neg.shape[-1]).T

    def direction(rows: Tensor, more: Tensor | None) -> Tensor:
        losses = []
        for i in range(rows.shape[0]):
            others = torch.cat([rows[i, :i], rows[i, i + 1:]])
            if more is not None:
                others = torch.cat([others, more[i]])
            losses.append(torch.logsumexp(others, dim=0) - rows[i, i])
        return torch.stack(losses).mean()

    return (direction(logits, extra) + direction(logits.T, None)) / 2


@functools.cache
def reference(world_size: int, case: Case) -> dict[str, Tensor]:
    """Loss and gradients on the global batch in one process (float64 from the same inputs)."""
    inputs = make_inputs(case.kind, world_size, getattr(torch, case.dtype))
    inputs = {name: value.double() for name, value in inputs.items()}
    params, features = towers(inputs, slice(None))
    image, text, scale = features["image"], features["text"], params["log_scale"].exp()
    if case.kind == "softmax":
        loss = ClipLoss()(image, text, scale)
    elif case.kind == "sigmoid":
        loss = SigLipLoss()(image, text, scale, params["bias"])
    elif case.kind == "negatives":
        loss = negclip_loss(image, text, features["neg"], scale)
    else:
        neg = features["neg"] if case.kind.endswith("negatives") else None
        loss = leave_one_out_loss(image, text, scale, neg)
    loss.backward()
    result = {"loss": loss.detach()}
    result |= {f"grad_{k}": f.grad for k, f in features.items() if f.grad is not None}
    result |= {f"grad_{k}": p.grad for k, p in params.items() if p.grad is not None}
    return result


def assert_close(actual: Tensor, expected: Tensor, dtype: str) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("world_size", "case"), CASES, ids=IDS)
def test_loss_value_equals_global_batch_loss_on_every_rank(world_size: int, case: Case):
    expected = reference(world_size, case)["loss"]
    for rank_result in world_results(world_size):
        assert_close(rank_result[f"grad/{case.key}"]["loss"], expected, case.dtype)


@pytest.mark.parametrize(("world_size", "case"), CASES, ids=IDS)
def test_parameter_gradients_after_ddp_mean_equal_global_batch_gradients(
    world_size: int, case: Case
):
    expected = reference(world_size, case)
    used = [p for p in PARAMETERS if not (p == "bias" and case.kind != "sigmoid")]
    for rank_result in world_results(world_size):
        result = rank_result[f"grad/{case.key}"]
        assert {f"grad_{p}" for p in used} <= result.keys()
        for name in used:
            assert_close(result[f"grad_{name}"], expected[f"grad_{name}"], case.dtype)


@pytest.mark.parametrize(("world_size", "case"), CASES, ids=IDS)
def test_feature_gradients_are_world_size_times_global_batch_gradients(world_size: int, case: Case):
    expected = reference(world_size, case)
    features = ["image", "text"] + (["neg"] if case.kind.endswith("negatives") else [])
    for rank, rank_result in enumerate(world_results(world_size)):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        result = rank_result[f"grad/{case.key}"]
        for name in features:
            assert_close(
                result[f"grad_{name}"], world_size * expected[f"grad_{name}"][rows], case.dtype
            )


@pytest.mark.parametrize("backend", ["ring", "gather"])
@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1])
def test_unequal_local_batches_raise_value_error_naming_every_rank(world_size: int, backend: str):
    for rank_result in world_results(world_size):
        message = rank_result[f"uneven/{backend}"]
        assert "same local batch size" in message
        assert all(f"rank {r}: b=" in message for r in range(world_size))


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1])
def test_ranks_compare_shapes_once_per_new_shape_not_on_every_call(world_size: int):
    for rank_result in world_results(world_size):
        # Six ring + six gather calls with b = 6, 6, 6, 3, 3, 6: two new shapes, two all-gathers.
        assert rank_result["shape_checks"] == [(6, 12, -1), (3, 12, -1)]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_auto_backend_is_ring_with_several_ranks_and_local_with_one(world_size: int):
    for rank_result in world_results(world_size):
        assert rank_result["choice"]["auto"] == ("ring" if world_size > 1 else "local")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_local_backend_is_refused_with_several_ranks(world_size: int):
    for rank_result in world_results(world_size):
        message = rank_result["choice"]["local_error"]
        if world_size == 1:
            assert message == ""
        else:
            assert f"world size is {world_size}" in message and "'ring'" in message
