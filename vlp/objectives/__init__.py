"""Training objectives, chosen and weighted by name in the recipe (docs/design.md §3)."""

# Importing each module registers its objective under the name in its @register(...).
from vlp.objectives import align_uniform, clip, coca, cwcl, multipos, negclip, siglip  # noqa: F401
from vlp.objectives.composite import WeightedObjectives, build_objectives
from vlp.objectives.registry import OBJECTIVES, get_objective_class, register

__all__ = ["OBJECTIVES", "WeightedObjectives", "build_objectives", "get_objective_class", "register"]
