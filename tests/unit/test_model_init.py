"""Every weight of a freshly built model is initialised: none keeps what `torch.empty` returned.

open_clip leaves a CoCa caption decoder's `text_projection` uninitialised; it held zeros in a
fresh process and stale bytes (NaN among them) later in a long one, which made
`loss_coca_caption` NaN at step 1 while the contrastive term stayed finite. torch's
`fill_uninitialized_memory` (with deterministic algorithms) fills every `torch.empty` with NaN,
so the worst case of reused memory happens on every build here, not once in a while.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from vlp.config import load_config
from vlp.data.shapesworld import describe, sample_scene
from vlp.distributed import build_backend
from vlp.models import VLP_MODELS, DualEncoder, build_model
from vlp.objectives import build_objectives

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "shapesworld-tiny-coca.yaml"


@contextmanager
def stale_memory() -> Iterator[None]:
    """`torch.empty` returns NaN-filled memory inside the block."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.utils.deterministic.fill_uninitialized_memory = saved[1]


def non_finite_weights(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]


@pytest.mark.parametrize("name", VLP_MODELS)
def test_every_weight_of_a_vlp_model_is_initialised(name):
    with stale_memory():
        model = build_model(name).model
    assert non_finite_weights(model) == []


def test_coca_caption_decoder_projection_is_random_not_left_empty():
    with stale_memory():
        projection = build_model("vlp-tiny-coca").model.text_decoder.text_projection
    width = projection.shape[0]
    assert torch.isfinite(projection).all()
    assert 0.9 < projection.std().item() * width**0.5 < 1.1  # normal(0, width^-0.5)


def shapesworld_captions(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [describe(sample_scene(rng, num_objects=rng.choice((1, 2))), rng).render()
            for _ in range(count)]


def test_tiny_coca_recipe_terms_are_finite_at_step_one_for_many_seeds():
    """The failing configuration (the recipe's model and objective weights, batch 16), built
    afresh from stale memory under 8 seeds, each with its own ShapesWorld captions and images:
    both terms of the first step are finite, and so is every gradient."""
    cfg = load_config(RECIPE)
    objectives = build_objectives(cfg.objectives, backend=build_backend("local"))
    for seed in range(8):
        torch.manual_seed(seed)
        with stale_memory():
            bundle = build_model(cfg.model.name)
        model = DualEncoder(bundle.model)
        batch = {"image": torch.randn(16, 3, 64, 64),
                 "text": bundle.tokenizer(shapesworld_captions(seed, 16))}
        with torch.set_grad_enabled(seed == 0):  # one backward is enough for the gradients
            terms = objectives(model(batch["image"], batch["text"]), batch)
        assert set(terms) == {"coca_contrastive", "coca_caption", "loss"}
        for term, value in terms.items():
            assert torch.isfinite(value), (seed, term, value)
        if seed == 0:
            terms["loss"].backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
