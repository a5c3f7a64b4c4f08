"""The gradient cache turns n micro-batches into one exact contrastive batch.

Shapes: n micro-batches of m rows, b = n·m rows per rank, W ranks, B = W·b global batch.

Reference: one plain step (forward with grad, loss, backward) on the whole batch in one process,
in float64, with a small dual encoder (docs/design.md §3's output dict, dropout in both towers). A
grad-cache step over n = 4 micro-batches must give the same loss and the same gradient for every
parameter, logit scale and bias included; on 2 gloo ranks under DDP (ring backend) the same
after DDP's mean, with one all-reduce per step.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from tests.distributed.harness import save_and_exit
from vlp.config import (
    ConfigError,
    DataConfig,
    ObjectiveSpec,
    RunConfig,
    SynthConfig,
    TrainConfig,
)
from vlp.distributed import build_backend
from vlp.objectives import build_objectives
from vlp.train.checks import check_config
from vlp.train.grad_cache import cached_backward

NUM_MICRO, MICRO, WORLD = 4, 6, 2
VOCAB, CONTEXT, NUM_NEGATIVES, NUM_POSITIVES, DIM = 40, 5, 2, 3, 16
OBJECTIVES = {
    "clip": [ObjectiveSpec("clip")],
    "siglip": [ObjectiveSpec("siglip")],
    "negclip": [ObjectiveSpec("negclip")],
    "cwcl": [ObjectiveSpec("cwcl")],  # weights from the (here trainable) text features
    "align_uniform": [ObjectiveSpec("clip"), ObjectiveSpec("align_uniform", weight=0.5)],
    "multipos": [ObjectiveSpec("multipos")],
}
CAPTION_FIELDS = {"negclip": ("neg_text",), "multipos": ("pos_text", "pos_mask")}
"""The extra caption fields of the batch each objective reads (the others leave them out)."""
TOLERANCE = 1e-10


class TinyDualEncoder(nn.Module):
    """`DualEncoder`'s contract on small towers: image (n, 3, 4, 4), text (n, L) token ids."""

    def __init__(self, *, dropout: float, batch_norm: bool):
        super().__init__()
        self.image_tower = nn.Sequential(nn.Flatten(), nn.Linear(48, 32),
                                         nn.BatchNorm1d(32) if batch_norm else nn.Identity(),
                                         nn.GELU(), nn.Dropout(dropout), nn.Linear(32, DIM))
        self.token_embedding = nn.Embedding(VOCAB, 32)
        self.text_tower = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(32, DIM))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0))

    def encode_text(self, text: Tensor) -> Tensor:
        return F.normalize(self.text_tower(self.token_embedding(text).mean(1)), dim=-1)

    def forward(self, image: Tensor, text: Tensor, neg_text: Tensor | None = None,
                pos_text: Tensor | None = None) -> dict:
        output = {"image_features": F.normalize(self.image_tower(image), dim=-1),
                  "text_features": self.encode_text(text),
                  "logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}
        for name, captions in (("neg_text_features", neg_text), ("pos_text_features", pos_text)):
            if captions is not None:
                b, k, length = captions.shape
                output[name] = self.encode_text(captions.reshape(b * k, length)).reshape(b, k, -1)
        return output


def make_model(*, dropout: float = 0.0, batch_norm: bool = False) -> TinyDualEncoder:
    torch.manual_seed(0)
    return TinyDualEncoder(dropout=dropout, batch_norm=batch_norm).double()


def make_batch(num_rows: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(num_rows, 3, 4, 4, generator=g, dtype=torch.float64),
        "text": torch.randint(VOCAB, (num_rows, CONTEXT), generator=g),
        "neg_text": torch.randint(VOCAB, (num_rows, NUM_NEGATIVES, CONTEXT), generator=g),
        "pos_text": torch.randint(VOCAB, (num_rows, NUM_POSITIVES, CONTEXT), generator=g),
        "pos_mask": torch.arange(NUM_POSITIVES)[None, :] < (
            torch.arange(num_rows) % NUM_POSITIVES + 1)[:, None],  # 1..K real positives
        "key": [f"{i:04d}" for i in range(num_rows)],
    }


def rows(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {name: value[start:stop] for name, value in batch.items()}


def split(batch: dict[str, Any], num_parts: int) -> list[dict[str, Any]]:
    size = len(batch["key"]) // num_parts
    return [rows(batch, i * size, (i + 1) * size) for i in range(num_parts)]


def gradients(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter's gradient; one that got none is 0 (the cache touches every output)."""
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for name, p in model.named_parameters()}


def plain_step(objective_name: str, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
    """Gradients and loss of one plain step on `batch` in one process."""
    model = make_model()
    objective = build_objectives(OBJECTIVES[objective_name], backend=build_backend("local"))
    batch = for_objective(objective_name, batch)
    captions = {k: batch[k] for k in ("neg_text", "pos_text") if k in batch}
    loss = objective(model(batch["image"], batch["text"], **captions), batch)["loss"]
    loss.backward()
    return gradients(model), loss.detach()


def for_objective(objective_name: str, batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` without the caption fields the objective does not read."""
    unread = {f for fields in CAPTION_FIELDS.values() for f in fields} - set(
        CAPTION_FIELDS.get(objective_name, ()))
    return {k: v for k, v in batch.items() if k not in unread}


def micro_batches_for(objective_name: str, batch: dict[str, Any]) -> list[dict[str, Any]]:
    return split(for_objective(objective_name, batch), NUM_MICRO)


def assert_same_gradients(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=TOLERANCE, atol=TOLERANCE,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
def test_cached_step_equals_one_plain_step_on_the_whole_batch(objective_name):
    batch = make_batch(NUM_MICRO * MICRO)
    expected_grads, expected_loss = plain_step(objective_name, batch)
    model = make_model()
    objective = build_objectives(OBJECTIVES[objective_name], backend=build_backend("local"))
    terms = cached_backward(model, objective, micro_batches_for(objective_name, batch),
                            device=torch.device("cpu"))
    torch.testing.assert_close(terms["loss"], expected_loss, rtol=TOLERANCE, atol=TOLERANCE)
    grads = gradients(model)
    assert_same_gradients(grads, expected_grads)
    assert grads["logit_scale"].abs() > 1e-4  # the temperature is trained, not left at 0
    if objective_name == "siglip":
        assert grads["logit_bias"].abs() > 1e-4


def test_plain_accumulation_is_not_the_whole_batch_gradient():
    """What the cache is for: the mean of per-micro-batch losses has other gradients."""
    batch = make_batch(NUM_MICRO * MICRO)
    expected, _ = plain_step("clip", batch)
    model = make_model()
    objective = build_objectives(OBJECTIVES["clip"], backend=build_backend("local"))
    for micro in split(batch, NUM_MICRO):
        (objective(model(micro["image"], micro["text"]), micro)["loss"] / NUM_MICRO).backward()
    assert not torch.allclose(gradients(model)["text_tower.0.weight"],
                              expected["text_tower.0.weight"], rtol=1e-3, atol=1e-6)


def test_dropout_and_batch_norm_see_each_micro_batch_once():
    """With dropout and BatchNorm, the step equals forwarding the micro-batches one after the
    other with grad from the same RNG state (dropout masks replayed, batch statistics per
    micro-batch), and leaves the RNG and the running statistics where those forwards do."""
    batch = make_batch(NUM_MICRO * MICRO)
    micro_batches = micro_batches_for("clip", batch)
    model = make_model(dropout=0.3, batch_norm=True)
    objective = build_objectives(OBJECTIVES["clip"], backend=build_backend("local"))
    torch.manual_seed(7)
    outputs = [model(m["image"], m["text"]) for m in micro_batches]
    joined = {k: torch.cat([o[k] for o in outputs]) for k in ("image_features", "text_features")}
    objective({**joined, "logit_scale": outputs[0]["logit_scale"]}, batch)["loss"].backward()
    expected, rng_after_reference = gradients(model), torch.get_rng_state()
    running_mean = model.image_tower[2].running_mean.clone()

    model = make_model(dropout=0.3, batch_norm=True)
    torch.manual_seed(7)
    cached_backward(model, objective, micro_batches, device=torch.device("cpu"))
    assert_same_gradients(gradients(model), expected)
    assert torch.equal(torch.get_rng_state(), rng_after_reference)
    torch.testing.assert_close(model.image_tower[2].running_mean, running_mean)
    assert model.image_tower[2].num_batches_tracked == NUM_MICRO


# ---------------------------------------------------------------- 2 gloo ranks under DDP


def test_observer_sees_the_last_micro_batch_output_and_gradients_are_unchanged():
    batch = make_batch(NUM_MICRO * MICRO)
    expected, _ = plain_step("negclip", batch)
    model = make_model()
    objective = build_objectives(OBJECTIVES["negclip"], backend=build_backend("local"))
    seen = []
    cached_backward(model, objective, micro_batches_for("negclip", batch),
                    device=torch.device("cpu"), observe=seen.append)
    assert_same_gradients(gradients(model), expected)
    (output,) = seen
    last = rows(batch, (NUM_MICRO - 1) * MICRO, NUM_MICRO * MICRO)
    with torch.no_grad():
        reference = make_model()(last["image"], last["text"], last["neg_text"])
    for name in ("image_features", "text_features", "neg_text_features"):
        torch.testing.assert_close(output[name], reference[name])


DDP_CASES = (("clip", "ring"), ("siglip", "ring"), ("multipos", "ring"), ("cwcl", "ring"),
             ("clip", "gather"))
"""(objective, backend) of the 2-rank grad-cache steps."""


def ddp_rank(rank: int, store_dir: str) -> None:
    """Each rank: a grad-cache step on its b rows of the global batch, for every objective."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=WORLD)
    results = {}
    try:
        batch = make_batch(WORLD * NUM_MICRO * MICRO)
        local = rows(batch, rank * NUM_MICRO * MICRO, (rank + 1) * NUM_MICRO * MICRO)
        for objective_name, backend in DDP_CASES:
            model = DistributedDataParallel(make_model())
            reductions = []

            def counting_allreduce(state, bucket, reductions=reductions):
                reductions.append(bucket.index())
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting_allreduce)
            objective = build_objectives(OBJECTIVES[objective_name],
                                         backend=build_backend(backend, tile_size=5))
            terms = cached_backward(model, objective, micro_batches_for(objective_name, local),
                                    device=torch.device("cpu"), no_sync=model.no_sync)
            results[f"{objective_name}-{backend}"] = {
                "loss": terms["loss"], "grads": gradients(model.module),
                "reductions": reductions}
    except BaseException:
        dist.destroy_process_group()
        raise
    save_and_exit(results, os.path.join(store_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_results() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as store_dir:
        mp.start_processes(ddp_rank, args=(store_dir,), nprocs=WORLD, start_method="spawn")
        return [torch.load(os.path.join(store_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(WORLD)]


@pytest.mark.parametrize("case", [f"{o}-{b}" for o, b in DDP_CASES])
def test_two_rank_cached_step_equals_one_process_on_the_global_batch(case, ddp_results):
    objective_name = case.split("-")[0]
    expected_grads, expected_loss = plain_step(objective_name,
                                               make_batch(WORLD * NUM_MICRO * MICRO))
    for rank_result in ddp_results:
        result = rank_result[case]
        torch.testing.assert_close(result["loss"], expected_loss, rtol=TOLERANCE, atol=TOLERANCE)
        assert_same_gradients(result["grads"], expected_grads)
        # DDP reduced once (the model is one bucket), on the last micro-batch only
        assert result["reductions"] == [0]


# ---------------------------------------------------------------- config rules


def synth_config(**train: Any) -> RunConfig:
    return RunConfig(data=DataConfig(synth=SynthConfig()), train=TrainConfig(**train))


def test_grad_cache_with_one_micro_batch_is_rejected():
    cfg = synth_config(grad_cache=True, grad_accum=1)
    with pytest.raises(ConfigError, match=r"train.grad_cache.*grad_accum >= 2"):
        cfg.validate()


def test_grad_cache_with_a_per_sample_caption_loss_is_rejected():
    cfg = synth_config(grad_cache=True, grad_accum=2)
    cfg.model.name = "vlp-tiny-coca"
    cfg.objectives = [ObjectiveSpec("coca")]
    with pytest.raises(ConfigError, match=r"objectives\[0\]: objective 'coca'.*'logits'"
                                          r".*train.grad_cache"):
        check_config(cfg)


def test_grad_cache_accepts_feature_objectives():
    cfg = synth_config(grad_cache=True, grad_accum=2)
    cfg.objectives = [ObjectiveSpec("clip"), ObjectiveSpec("align_uniform", weight=0.5)]
    cfg.validate()
    check_config(cfg)
