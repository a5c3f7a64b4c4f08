"""Training objectives, chosen and weighted by name in the recipe (DESIGN §3)."""

from vlp.objectives import clip  # noqa: F401  (registers "clip")
from vlp.objectives.composite import WeightedObjectives, build_objectives
from vlp.objectives.registry import OBJECTIVES, get_objective_class, register

__all__ = ["OBJECTIVES", "WeightedObjectives", "build_objectives", "get_objective_class", "register"]
