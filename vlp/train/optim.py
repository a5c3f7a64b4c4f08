"""AdamW with decoupled weight decay, and a linear-warmup cosine schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from vlp.config import OptimConfig


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, embeddings and the temperature are not decayed (as open_clip)."""
    return (
        param.ndim < 2
        or "bn" in name
        or "ln" in name
        or "bias" in name
        or "logit_scale" in name
        or "logit_bias" in name
        or "embedding" in name
    )


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with `cfg.weight_decay` on the decayed group."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear from 0 to 1 over `warmup_steps`, then cosine to 0 at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> LambdaLR:
    return LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps),
    )
