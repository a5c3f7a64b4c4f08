"""A weighted sum of objectives: what the trainer optimises."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp.objectives.registry import build_one


class WeightedObjectives(nn.Module):
    """Runs each objective, prefixes nothing, and adds `loss` = Σ weight · term.

    Every term an objective returns is logged under its own name; the weight of an objective
    applies to all of its terms.
    """

    def __init__(self, objectives: list[tuple[nn.Module, float]]):
        super().__init__()
        self.objectives = nn.ModuleList(obj for obj, _ in objectives)
        self.weights = [w for _, w in objectives]

    def forward(self, output: dict[str, Any], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = 0.0
        for objective, weight in zip(self.objectives, self.weights, strict=True):
            for name, value in objective(output, batch).items():
                if name in terms:
                    raise ValueError(f"two objectives both return a term named {name!r}")
                terms[name] = value
                total = total + weight * value
        terms["loss"] = total
        return terms

    def required_batch_fields(self) -> set[str]:
        return set().union(*(getattr(o, "requires", set()) for o in self.objectives))


def build_objectives(specs: list[Any], *, backend: Any) -> WeightedObjectives:
    """Build from `ObjectiveSpec`s (name, weight, params) as read from the recipe."""
    return WeightedObjectives(
        [(build_one(s.name, s.params, backend=backend), s.weight) for s in specs]
    )
