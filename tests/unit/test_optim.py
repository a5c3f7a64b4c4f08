"""Optimizer groups and the learning-rate schedule."""

import pytest
import torch

from vlp.config import OptimConfig
from vlp.models import build_model
from vlp.train.optim import apply_optim_settings, build_optimizer, build_scheduler, warmup_cosine


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


def _trained_for(steps: int, *, lr: float, weight_decay: float, beta2: float = 0.98):
    model = torch.nn.Linear(4, 4)  # weight: decayed; bias: not
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=weight_decay, beta1=0.9,
                                             beta2=beta2, eps=1e-6))
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10)
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _resumed(opt, sched, cfg: OptimConfig):
    """A new run's optimizer and scheduler (from `cfg`) restored from `opt` and `sched`."""
    model = torch.nn.Linear(4, 4)
    new_opt = build_optimizer(model, cfg)
    new_sched = build_scheduler(new_opt, warmup_steps=2, total_steps=10)
    new_opt.load_state_dict(opt.state_dict())
    new_sched.load_state_dict(sched.state_dict())
    return new_opt, new_sched


def test_a_resumed_run_trains_with_its_own_optim_settings_not_the_checkpoints():
    _, opt, sched = _trained_for(3, lr=1e-3, weight_decay=0.1)
    cfg = OptimConfig(lr=1e-5, weight_decay=0.05, beta2=0.999, warmup_steps=2)
    new_opt, new_sched = _resumed(opt, sched, cfg)
    assert new_opt.param_groups[1]["lr"] == pytest.approx(1e-3 * warmup_cosine(
        3, warmup_steps=2, total_steps=10))  # restoring brought back the old settings
    said = []

    changed = apply_optim_settings(new_opt, new_sched, cfg, say=said.append)

    assert changed == ["lr 0.001 -> 1e-05", "beta2 0.98 -> 0.999", "weight_decay 0.1 -> 0.05"]
    assert said == ["resume: optim settings differ from the checkpoint's; using this run's: "
                    "lr 0.001 -> 1e-05, beta2 0.98 -> 0.999, weight_decay 0.1 -> 0.05"]
    no_decay, decay = new_opt.param_groups
    for step in (3, 4):  # the current lr, and the schedule's next one
        expected = 1e-5 * warmup_cosine(step, warmup_steps=2, total_steps=10)
        assert [no_decay["lr"], decay["lr"]] == pytest.approx([expected, expected])
        assert new_sched.get_last_lr() == pytest.approx([expected, expected])
        new_opt.step()
        new_sched.step()
    assert no_decay["betas"] == decay["betas"] == (0.9, 0.999)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)


def test_resuming_with_the_same_optim_settings_changes_nothing():
    _, opt, sched = _trained_for(3, lr=1e-3, weight_decay=0.1)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=2)
    new_opt, new_sched = _resumed(opt, sched, cfg)
    before = [dict(g, params=None) for g in new_opt.param_groups]
    said = []
    assert apply_optim_settings(new_opt, new_sched, cfg, say=said.append) == [] and not said
    after = [dict(g, params=None, betas=tuple(g["betas"])) for g in new_opt.param_groups]
    assert after == [dict(g, betas=tuple(g["betas"])) for g in before]


def test_the_update_is_one_fused_kernel_and_the_same_adamw_as_the_per_tensor_loop():
    torch.manual_seed(0)
    model = build_model("vlp-tiny-rn").model
    reference = build_model("vlp-tiny-rn").model
    reference.load_state_dict(model.state_dict())
    start = model.token_embedding.weight.detach().clone()
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.98, eps=1e-6)
    fused = build_optimizer(model, cfg)
    assert all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.AdamW(
        [{"params": [dict(reference.named_parameters())[n] for n, _ in named], **opts}
         for named, opts in _groups_by_name(model, fused)], foreach=False)
    for _ in range(3):
        for net in (model, reference):
            for p in net.parameters():
                p.grad = torch.ones_like(p) * 1e-3 * (1 + p.numel() % 7)
        fused.step()
        loop.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(model.token_embedding.weight, start)  # the steps did update


def _groups_by_name(model, optimizer):
    """`optimizer`'s param groups as (named params, hyper-parameters) of `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [([(names[id(p)], p) for p in group["params"]],
             {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")})
            for group in optimizer.param_groups]
