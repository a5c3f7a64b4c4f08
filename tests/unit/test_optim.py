"""Optimizer groups and the learning-rate schedule."""

import pytest
import torch

from vlp.config import OptimConfig
from vlp.models import build_model
from vlp.train.optim import build_optimizer, build_scheduler, warmup_cosine


def test_schedule_warms_up_linearly_then_decays_to_zero():
    values = [warmup_cosine(s, warmup_steps=10, total_steps=110) for s in range(111)]
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.5)
    assert values[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_scheduler_applies_peak_lr_after_warmup():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([param], lr=0.5)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.5])


def test_gains_biases_embeddings_and_temperature_are_not_decayed():
    model = build_model("vlp-tiny").model
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.2, beta1=0.9, beta2=0.98,
                                             eps=1e-6))
    no_decay, decay = opt.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.logit_scale) in ids
    assert id(model.token_embedding.weight) in ids
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))
