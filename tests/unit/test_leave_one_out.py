"""The leave-one-out softmax (`denominator: leave_one_out`): DCL and InfoLOOB are one formula.

Shapes: b batch, D feature dim, K hard negatives per image. In float64, one process; the 1–4
rank parity of the gather and ring backends is in tests/distributed/test_global_batch_gradients.py
(kinds leave_one_out and leave_one_out_negatives).

The two references are written after the papers' own code, on plain features:
- DCL (Yeh et al., 2022): the decoupled contrastive loss of one direction, −⟨z1_i, z2_i⟩/τ +
  log Σ_{j≠i} exp(⟨z1_i, z2_j⟩/τ), summed over the two directions. Its SimCLR form also counts
  the same-view negatives ⟨z1_i, z1_j⟩, which CLIP's cross-modal loss never has, so they are
  left out here.
- InfoLOOB (Fürst et al., 2022, CLOOB): `infoLOOB_loss(x, y, i, inv_tau)` of ml-jku/cloob:
  τ·(mean_i −k_ii + mean_i logsumexp_j (k_ij masked to −1000 on i = j)), k = x·yᵀ/τ, summed over
  the image and text directions (CLOOB feeds it Hopfield-retrieved features; here the features
  themselves).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.config import ConfigError, ObjectiveSpec, build_typed
from vlp.distributed import GatherBackend, LocalBackend, RingBackend
from vlp.objectives import build_objectives, get_objective_class

B, D, K = 11, 16, 3
DCL_SMALL_NUM = torch.log(torch.tensor(1e-45, dtype=torch.float64))
"""The DCL code's additive mask for the positive (log 1e-45): exp of it is ~1e-45 of a term."""
CLOOB_LARGE_NEG = -1000.0
"""The CLOOB code's value for the masked positive logit."""


def unit_rows(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def inputs() -> dict[str, Tensor]:
    return {
        "image": unit_rows(B, D, seed=1).requires_grad_(),
        "text": unit_rows(B, D, seed=2).requires_grad_(),
        "neg": unit_rows(B, K, D, seed=3).requires_grad_(),
        "scale": torch.tensor(23.0, dtype=torch.float64, requires_grad=True),
    }


def loss_and_grads(loss, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    wrt = list(tensors.values())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return {"loss": loss.detach()} | {
        k: g for k, g in zip(tensors, grads, strict=True) if g is not None
    }


def vlp_loss(backend, t: dict[str, Tensor], *, negatives: bool = False) -> Tensor:
    neg = t["neg"] if negatives else None
    return backend.softmax(t["image"], t["text"], t["scale"], neg_text_features=neg,
                           leave_one_out=True)


def dcl_one_way(z1: Tensor, z2: Tensor, temperature: Tensor) -> Tensor:
    positive = -(z1 * z2).sum(dim=1) / temperature
    similarity = z1 @ z2.T / temperature
    negative = torch.logsumexp(similarity + torch.eye(z1.shape[0]) * DCL_SMALL_NUM, dim=1)
    return (positive + negative).mean()


def dcl_reference(image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    temperature = 1 / scale
    return dcl_one_way(image, text, temperature) + dcl_one_way(text, image, temperature)


def cloob_infoloob(x: Tensor, y: Tensor, i: Tensor, inv_tau: float) -> Tensor:
    tau = 1 / inv_tau
    k = x @ y.T / tau
    positives = -torch.mean(torch.sum(k * i, dim=1))
    arg_lse = k * torch.logical_not(i) + i * CLOOB_LARGE_NEG
    negatives = torch.mean(torch.logsumexp(arg_lse, dim=1))
    return tau * (positives + negatives)


def infoloob_reference(image: Tensor, text: Tensor, inv_tau: float) -> Tensor:
    identity = torch.eye(image.shape[0]) > 0.5
    return cloob_infoloob(image, text, identity, inv_tau) + cloob_infoloob(text, image, identity,
                                                                            inv_tau)


def assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor], tol: float = 1e-12):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=tol, atol=tol, msg=key)


def test_leave_one_out_is_half_the_two_way_dcl_loss_with_its_gradients():
    t = inputs()
    expected = loss_and_grads(dcl_reference(t["image"], t["text"], t["scale"]) / 2, t)
    assert_same(loss_and_grads(vlp_loss(LocalBackend(), t), t), expected)


def test_leave_one_out_is_cloob_infoloob_over_two_tau_with_its_feature_gradients():
    t = inputs()
    scale = float(t["scale"].detach())  # CLOOB's inverse temperature is a fixed hyperparameter
    features = {"image": t["image"], "text": t["text"]}
    expected = loss_and_grads(infoloob_reference(t["image"], t["text"], scale) * scale / 2,
                              features)
    actual = loss_and_grads(vlp_loss(LocalBackend(), t), features)
    assert_same(actual, expected)


def test_the_parity_inputs_tell_leave_one_out_from_infonce():
    """InfoNCE misses the DCL reference by far more than the parity tolerance on these inputs,
    so the parity tests above would catch a positive left in the denominator."""
    t = inputs()
    infonce = LocalBackend().softmax(t["image"], t["text"], t["scale"])
    reference = dcl_reference(t["image"], t["text"], t["scale"]) / 2
    assert (reference - infonce).abs() > 1e-3


@pytest.mark.parametrize("negatives", [False, True], ids=["clip", "negclip"])
@pytest.mark.parametrize("backend", [GatherBackend(), RingBackend(tile_size=1),
                                     RingBackend(tile_size=4), RingBackend(tile_size=64)],
                         ids=["gather", "ring-tile1", "ring-tile4", "ring-tile64"])
def test_gather_and_ring_in_one_process_match_local(backend, negatives: bool):
    t = inputs()
    expected = loss_and_grads(vlp_loss(LocalBackend(), t, negatives=negatives), t)
    assert_same(loss_and_grads(vlp_loss(backend, t, negatives=negatives), t), expected)


def one_hot_images_logits(diagonal: float) -> tuple[dict[str, Tensor], Tensor]:
    """Images = the b one-hot rows, so logit_ij = s·text_j[i] and dL/dtext_j[i] = s·dL/dlogit_ij:
    the text gradient reads off the gradient of every logit. `diagonal` sets the positives."""
    text = unit_rows(B, B, seed=4).detach().clone()
    text.diagonal().fill_(diagonal)
    t = {"image": torch.eye(B, dtype=torch.float64), "text": text.requires_grad_(),
         "scale": torch.tensor(3.0, dtype=torch.float64)}
    return t, t["scale"] * t["image"] @ t["text"].T


@pytest.mark.parametrize("backend", [LocalBackend(), GatherBackend(), RingBackend(tile_size=4)],
                         ids=["local", "gather", "ring"])
def test_each_positive_logit_has_gradient_minus_one_over_b_whatever_its_value(backend):
    """dL/ds_ii = −1/(2b) per direction: no softmax probability of the positive scales it (the
    negative–positive coupling DCL removes), so it does not vanish as the positive wins."""
    for diagonal in (-0.5, 0.0, 2.0, 9.0):
        t, _ = one_hot_images_logits(diagonal)
        (grad_text,) = torch.autograd.grad(vlp_loss(backend, t), [t["text"]])
        logit_grads = grad_text.T / t["scale"]
        torch.testing.assert_close(logit_grads.diagonal(), torch.full((B,), -1.0 / B,
                                   dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_infonce_positive_logit_gradient_shrinks_as_the_positive_wins():
    grads = []
    for diagonal in (0.0, 9.0):
        t, _ = one_hot_images_logits(diagonal)
        loss = LocalBackend().softmax(t["image"], t["text"], t["scale"])
        (grad_text,) = torch.autograd.grad(loss, [t["text"]])
        grads.append(float(grad_text.diagonal().mean() / t["scale"]))
    assert grads[0] < -0.5 / B and -1e-6 < grads[1] < 0


def test_loss_plus_mean_positive_logit_does_not_depend_on_the_positives():
    """The positives are not in any denominator: moving them moves the loss by −their mean."""
    rest = []
    for diagonal in (-0.5, 2.0, 9.0):
        t, logits = one_hot_images_logits(diagonal)
        loss = vlp_loss(LocalBackend(), t)
        rest.append(float((loss + logits.diagonal().mean()).detach()))
    assert rest == pytest.approx([rest[0]] * 3, abs=1e-12)


def test_leave_one_out_goes_below_zero_where_infonce_cannot():
    t, _ = one_hot_images_logits(9.0)  # positives 27, negatives |s·t| < 3
    assert float(vlp_loss(LocalBackend(), t).detach()) < -20
    assert float(LocalBackend().softmax(t["image"], t["text"], t["scale"]).detach()) >= 0


@pytest.mark.parametrize("backend", [LocalBackend(), GatherBackend(), RingBackend()],
                         ids=["local", "gather", "ring"])
def test_a_single_pair_is_refused(backend):
    x = unit_rows(1, D, seed=5)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        backend.softmax(x, x, torch.tensor(10.0, dtype=torch.float64), leave_one_out=True)


class RecordingBackend:
    name = "recording"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def softmax(self, image, text, scale, **kwargs):
        self.calls.append(kwargs)
        return scale * 0


@pytest.mark.parametrize("name", ["clip", "negclip"])
@pytest.mark.parametrize(("denominator", "leave_one_out"),
                         [("all", False), ("leave_one_out", True)])
def test_clip_and_negclip_pass_their_denominator_to_the_backend(name, denominator,
                                                                leave_one_out):
    backend = RecordingBackend()
    objective = build_objectives([ObjectiveSpec(name, params={"denominator": denominator})],
                                 backend=backend)
    x = unit_rows(2, D, seed=6)
    objective({"image_features": x, "text_features": x, "logit_scale": torch.tensor(1.0),
               "neg_text_features": unit_rows(2, 1, D, seed=7)}, {})
    assert backend.calls[0]["leave_one_out"] is leave_one_out


def test_default_denominator_is_all():
    assert get_objective_class("clip").Config().denominator == "all"


@pytest.mark.parametrize("name", ["clip", "negclip"])
def test_unknown_denominator_is_a_config_error_naming_the_choices(name):
    with pytest.raises(ConfigError, match="leave_one_out"):
        build_typed(get_objective_class(name).Config, {"denominator": "loo"}, "objectives[0]")
