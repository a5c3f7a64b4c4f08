"""The ring backend never creates a (b, B) tensor: its largest tensor is O(b·D + tile²).

A TorchDispatchMode records the largest output of every op during forward and backward on each
rank (see `harness.peak_numel_job`). The same probe on the gather backend sees b×B-sized
tensors, which shows the probe would catch them.
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import MEMORY_PROBE, MEMORY_PROBE_WORLD_SIZES, world_results

B_LOCAL = MEMORY_PROBE["local_batch"]
DIM = MEMORY_PROBE["dim"]
TILE = MEMORY_PROBE["tile_size"]
NUM_NEG = MEMORY_PROBE["num_negatives"]


@pytest.mark.parametrize("kind", ["negatives", "sigmoid"])
@pytest.mark.parametrize("world_size", MEMORY_PROBE_WORLD_SIZES)
def test_ring_largest_tensor_is_a_feature_block_or_tile_never_local_by_global(
    world_size: int, kind: str
):
    feature_block = (NUM_NEG if kind == "negatives" else 1) * B_LOCAL * DIM  # (b·K, D) or (b, D)
    bound = max(TILE * TILE, feature_block)
    assert bound < B_LOCAL * world_size * B_LOCAL  # the bound is below b×B, so the test has teeth
    for rank_result in world_results(world_size):
        probe = rank_result[f"numel/ring-{kind}"]
        assert probe["max_numel"] <= bound, probe


@pytest.mark.parametrize("kind", ["negatives", "sigmoid"])
@pytest.mark.parametrize("world_size", MEMORY_PROBE_WORLD_SIZES)
def test_gather_largest_tensor_is_local_by_global_logits(world_size: int, kind: str):
    for rank_result in world_results(world_size):
        probe = rank_result[f"numel/gather-{kind}"]
        assert probe["max_numel"] >= B_LOCAL * world_size * B_LOCAL, probe
