"""The objective registry: YAML names an objective, this maps the name to its class.

An objective is an `nn.Module` whose `forward(output, batch)` returns a dict of named scalar
losses (docs/design.md §3). Each class carries its own `Config` dataclass (its recipe parameters) and is
built as `cls(cfg, backend=...)`, where `backend` is the contrastive backend of
`vlp.distributed` that every contrastive term goes through.
"""

from __future__ import annotations

from typing import Any

from torch import nn

OBJECTIVES: dict[str, type[nn.Module]] = {}


def register(name: str):
    """Class decorator adding an objective under `name`; a duplicate name is an error."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice ({OBJECTIVES[name]} and {cls})")
        if not hasattr(cls, "Config"):
            raise TypeError(f"objective {name!r} ({cls}) has no nested Config dataclass")
        OBJECTIVES[name] = cls
        return cls

    return add


def get_objective_class(name: str) -> type[nn.Module]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_one(name: str, params: dict[str, Any], *, backend: Any) -> nn.Module:
    cls = get_objective_class(name)
    return cls(cls.Config(**params), backend=backend)
