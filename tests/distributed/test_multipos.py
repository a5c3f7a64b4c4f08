"""The gather and ring backends' multi-positive loss on 2 gloo ranks is the one-process global
loss: the same value on every rank, and after DDP's mean the same gradients, in float64, with
ranks holding different numbers of real captions. The ring never builds a (b, B·K) tensor."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.distributed.harness import (
    MEMORY_PROBE,
    MULTIPOS_BATCH,
    multipos_inputs,
    multipos_jobs,
    multipos_loss,
    spawned_results,
)
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


def test_the_ranks_hold_different_numbers_of_real_captions():
    mask = multipos_inputs(WORLD_SIZE)["mask"]
    per_rank = [int(mask[r * MULTIPOS_BATCH:(r + 1) * MULTIPOS_BATCH].sum())
                for r in range(WORLD_SIZE)]
    assert per_rank[0] != per_rank[1], per_rank  # so a per-rank count would give another loss


@pytest.mark.parametrize("backend", ["gather", "ring"])
@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_multipos_equals_the_one_process_global_loss_and_gradients(rank: int, backend: str):
    expected = global_reference()
    result = ranks()[rank][f"multipos/{backend}"]
    assert set(result) == set(expected) == {"loss", "grad_image", "grad_pos", "grad_log_scale"}
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_ring_multipos_largest_tensor_is_a_caption_block_or_tile_never_local_by_global():
    b, dim, k, tile = (MEMORY_PROBE[n] for n in ("local_batch", "dim", "num_negatives",
                                                  "tile_size"))
    bound = max(tile * tile, b * k * dim)  # a (b·K, D) caption block
    logits = b * WORLD_SIZE * k * b  # (b, B·K): image rows against every caption
    assert bound < logits  # the bound is below the gather's logits, so the test has teeth
    for rank_result in ranks():
        assert rank_result["numel/ring-multipos"]["max_numel"] <= bound, rank_result
        assert rank_result["numel/gather-multipos"]["max_numel"] >= logits, rank_result
