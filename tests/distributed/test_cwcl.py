"""CWCL on the gather and ring backends, 2 gloo ranks: the global-batch loss and gradients of
one process, and the ring never builds a (b, B) tensor.

Shapes: b local batch, W = 2 world size, B = W·b global batch. The towers, inputs and DDP
emulation are the harness's (tests/distributed/harness.py); the weights come from the text
features (and, in a second case, the image features) of the whole global batch. The reference
is the local backend on the global batch in one process, whose agreement with the CWCL formula
is checked in tests/unit/test_cwcl.py. Parameter gradients are compared after DDP's mean; raw
feature gradients are W × the global-batch gradient of the rank's rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.distributed.harness import (
    LOCAL_BATCH,
    MEMORY_PROBE,
    MaxNumel,
    _ddp_mean,
    make_inputs,
    spawned_results,
    towers,
)
from vlp.distributed import build_backend
from vlp.objectives.cwcl import WEIGHTS

WORLD_SIZE = 2
CASES = [("text", "shifted_cosine"), ("image", "clamped_cosine")]
BACKENDS = ("gather", "ring")
TILE_SIZE = 4
"""Divides neither b = 9 nor anything else here: the ring's partial tiles are used."""
PARAMETERS = ("image_proj", "text_proj", "log_scale")


def cwcl_loss(backend: Any, params: dict, features: dict, weights_from: str,
              weighting: str) -> Tensor:
    return backend.weighted_softmax(
        features["image"], features["text"], params["log_scale"].exp(),
        weight_features=features[weights_from], weight=WEIGHTS[weighting])


def results(loss: Tensor, params: dict, features: dict, *, ddp: bool) -> dict[str, Tensor]:
    loss.backward()
    out = {"loss": loss.detach()}
    out |= {f"grad_{name}": features[name].grad for name in ("image", "text")}
    for name in PARAMETERS:
        out[f"grad_{name}"] = _ddp_mean(params[name].grad) if ddp else params[name].grad
    return out


def gradient_job(rank: int, world_size: int, backend: str, weights_from: str,
                 weighting: str) -> dict[str, Tensor]:
    inputs = make_inputs("softmax", world_size, torch.float64)
    params, features = towers(inputs, slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH))
    loss = cwcl_loss(build_backend(backend, tile_size=TILE_SIZE), params, features,
                     weights_from, weighting)
    return results(loss, params, features, ddp=True)


def peak_numel_job(rank: int, world_size: int, backend: str) -> dict[str, Any]:
    """Largest tensor created by a cwcl forward+backward on this rank (weights from the image
    features: the weight features travel the ring on their own)."""
    b, dim, tile = (MEMORY_PROBE[n] for n in ("local_batch", "dim", "tile_size"))
    g = torch.Generator().manual_seed(rank)
    x, y = (F.normalize(torch.randn(b, dim, generator=g), dim=-1).requires_grad_() for _ in "xy")
    scale = torch.tensor(20.0, requires_grad=True)
    loss_backend = build_backend(backend, tile_size=tile)
    with MaxNumel() as probe:
        loss_backend.weighted_softmax(x, y, scale, weight_features=x,
                                      weight=WEIGHTS["shifted_cosine"]).backward()
    return {"max_numel": probe.max_numel, "op": probe.op}


def cwcl_jobs(world_size: int) -> dict[str, tuple[Callable, dict]]:
    jobs: dict[str, tuple[Callable, dict]] = {}
    for backend in BACKENDS:
        for weights_from, weighting in CASES:
            jobs[f"cwcl/{backend}/{weights_from}"] = (
                gradient_job,
                {"backend": backend, "weights_from": weights_from, "weighting": weighting})
        jobs[f"numel/{backend}"] = (peak_numel_job, {"backend": backend})
    return jobs


@functools.cache
def rank_results() -> list[dict]:
    return spawned_results(WORLD_SIZE, cwcl_jobs)


@functools.cache
def global_reference(weights_from: str, weighting: str) -> dict[str, Tensor]:
    inputs = make_inputs("softmax", WORLD_SIZE, torch.float64)
    params, features = towers(inputs, slice(None))
    loss = cwcl_loss(build_backend("local"), params, features, weights_from, weighting)
    return results(loss, params, features, ddp=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("weights_from", "weighting"), CASES)
def test_two_ranks_equal_the_one_process_global_batch_loss_and_gradients(
    backend, weights_from, weighting
):
    expected = global_reference(weights_from, weighting)
    for rank, ranks in enumerate(rank_results()):
        got = ranks[f"cwcl/{backend}/{weights_from}"]
        assert got.keys() == expected.keys()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for key, value in expected.items():
            if key in ("grad_image", "grad_text"):  # W × the global gradient of its rows
                value = WORLD_SIZE * value[rows]
            torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12,
                                       msg=f"rank {rank}: {key}")


def test_ring_largest_tensor_is_a_feature_block_or_tile_never_local_by_global():
    b, dim, tile = (MEMORY_PROBE[n] for n in ("local_batch", "dim", "tile_size"))
    bound = max(tile * tile, b * dim)
    logits = b * WORLD_SIZE * b  # (b, B)
    assert bound < logits  # the bound is below the gather's logits, so the test has teeth
    for rank_result in rank_results():
        assert rank_result["numel/ring"]["max_numel"] <= bound, rank_result["numel/ring"]
        assert rank_result["numel/gather"]["max_numel"] >= logits, rank_result["numel/gather"]
