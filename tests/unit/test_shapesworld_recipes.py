"""The tiny objective recipes start where their objectives can show their effect on ShapesWorld."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from open_clip.loss import SigLipLoss

from vlp.config import load_config
from vlp.data.shapesworld import make_train_sample, render_image
from vlp.models import build_tokenizer, create_model, model_spec

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def sigmoid_loss_at_prior(batch_size: int) -> float:
    """SigLIP's loss per image when every logit is the log prior of a positive pair,
    sigmoid(b) = 1/B: -ln(1/B) - (B-1) ln(1 - 1/B) = ln B + ~1."""
    p = 1 / batch_size
    return -math.log(p) - (batch_size - 1) * math.log1p(-p)


def test_siglip_recipe_bias_is_the_log_prior_of_a_positive_at_its_batch_size():
    cfg = load_config(RECIPES / "shapesworld-tiny-siglip.yaml")
    assert math.isclose(cfg.model.init_logit_bias, -math.log(cfg.data.batch_size), abs_tol=1e-5)
    assert math.isclose(cfg.model.init_logit_scale, math.log(10), abs_tol=1e-5)


def test_siglip_recipe_initial_loss_is_what_its_batch_size_implies():
    """On a real batch through the untrained model: ~ln B + 1 (5.85 at B = 128), where the SigLIP
    paper's b = -10 would start at ~10 and leave the loss dominated by the positives."""
    cfg = load_config(RECIPES / "shapesworld-tiny-siglip.yaml")
    batch = cfg.data.batch_size
    torch.manual_seed(0)
    spec = model_spec(cfg.model.name, init_logit_scale=cfg.model.init_logit_scale,
                      init_logit_bias=cfg.model.init_logit_bias)
    model, _, preprocess = create_model(spec)
    tokenizer = build_tokenizer(spec.text)
    samples = [make_train_sample(i, seed=0) for i in range(batch)]
    images = torch.stack([preprocess(render_image(s.scene)) for s in samples])
    with torch.no_grad():
        out = model(images, tokenizer([s.caption for s in samples]))
        loss = SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"],
                            out["logit_bias"]).item()
        paper = SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"],
                             torch.tensor(-10.0)).item()
    assert abs(loss - sigmoid_loss_at_prior(batch)) < 0.5, loss
    assert paper > loss + 3
