"""CWCL on the gather backend, 2 gloo ranks: the global-batch loss and gradients of one process.

Shapes: b local batch, W = 2 world size, B = W·b global batch. The towers, inputs and DDP
emulation are the harness's (tests/distributed/harness.py); the weights come from the text
features (and, in a second case, the image features) of the whole global batch. The reference
is the local backend on the global batch in one process, whose agreement with the CWCL formula
is checked in tests/unit/test_cwcl.py.
"""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from tests.distributed.harness import LOCAL_BATCH, _ddp_mean, make_inputs, towers
from vlp.distributed import build_backend
from vlp.objectives.cwcl import WEIGHTS

WORLD_SIZE = 2
CASES = [("text", "shifted_cosine"), ("image", "clamped_cosine")]


def cwcl_loss(backend_name: str, params: dict, features: dict, weights_from: str,
              weighting: str) -> Tensor:
    return build_backend(backend_name).weighted_softmax(
        features["image"], features["text"], params["log_scale"].exp(),
        weight_features=features[weights_from], weight=WEIGHTS[weighting])


def results(loss: Tensor, params: dict, features: dict, *, ddp: bool) -> dict[str, Tensor]:
    loss.backward()
    out = {"loss": loss.detach()}
    for name in ("image_proj", "text_proj", "log_scale"):
        out[f"grad_{name}"] = _ddp_mean(params[name].grad) if ddp else params[name].grad
    return out


def _rank_main(rank: int, store_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        out = {}
        for weights_from, weighting in CASES:
            inputs = make_inputs("softmax", WORLD_SIZE, torch.float64)
            params, features = towers(inputs, slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH))
            loss = cwcl_loss("gather", params, features, weights_from, weighting)
            out[weights_from] = results(loss, params, features, ddp=True)
    finally:
        dist.destroy_process_group()
    torch.save(out, os.path.join(store_dir, f"rank{rank}.pt"))


@functools.cache
def rank_results() -> list[dict]:
    with tempfile.TemporaryDirectory() as store_dir:
        mp.start_processes(_rank_main, args=(store_dir,), nprocs=WORLD_SIZE, start_method="spawn")
        return [torch.load(os.path.join(store_dir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize(("weights_from", "weighting"), CASES)
def test_gather_on_two_ranks_equals_the_one_process_global_batch_loss_and_gradients(
    weights_from, weighting
):
    inputs = make_inputs("softmax", WORLD_SIZE, torch.float64)
    params, features = towers(inputs, slice(None))
    loss = cwcl_loss("local", params, features, weights_from, weighting)
    expected = results(loss, params, features, ddp=False)
    for rank, ranks in enumerate(rank_results()):
        got = ranks[weights_from]
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-10,
                                       msg=f"rank {rank}: {key}")
