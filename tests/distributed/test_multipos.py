"""The gather backend's multi-positive loss on 2 gloo ranks is the one-process global loss:
the same value on every rank, and after DDP's mean the same gradients, in float64."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.harness import multipos_inputs, multipos_jobs, multipos_loss, spawned_results
from vlp.distributed import build_backend

WORLD_SIZE = 2


@functools.cache
def ranks() -> list[dict]:
    return spawned_results(WORLD_SIZE, multipos_jobs)


def global_reference() -> dict[str, torch.Tensor]:
    inputs = multipos_inputs(WORLD_SIZE)
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    loss = multipos_loss(build_backend("local"), leaves, slice(None))
    loss.backward()
    return {"loss": loss.detach()} | {f"grad_{k}": v.grad for k, v in leaves.items()
                                      if v.grad is not None}


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_gather_multipos_equals_the_one_process_global_loss_and_gradients(rank: int):
    expected = global_reference()
    result = ranks()[rank]["multipos/gather"]
    assert set(result) == set(expected) == {"loss", "grad_image", "grad_pos", "grad_log_scale"}
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value, rtol=1e-10, atol=1e-12, msg=name)
