"""Temperature schedules: the softmax temperature τ = 1/exp(logit_scale) as a function of the step.

`loss.temperature.mode` in a recipe picks one (`vlp.config.TemperatureConfig`):
- learned (default): logit_scale is a trained parameter, as in CLIP; no schedule.
- fixed: τ = start at every step; logit_scale gets no optimizer updates.
- linear, cosine: τ goes from `start` at the first step to `end` at the last, on a straight
  line or a half cosine; logit_scale gets no optimizer updates.

The modality-gap literature (Liang et al., 2022, "Mind the Gap") finds the temperature sets the
size of the gap. A schedule is a function of the step only, so a resumed run needs nothing saved
to continue it: the trainer sets logit_scale = log(1/τ(step)) before every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _fixed(progress: float, start: float, end: float) -> float:
    return start


def _linear(progress: float, start: float, end: float) -> float:
    return start + (end - start) * progress


def _cosine(progress: float, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Callable[[float, float, float], float] | None] = {
    "learned": None,
    "fixed": _fixed,
    "linear": _linear,
    "cosine": _cosine,
}
"""Temperature modes → τ(progress in [0, 1], start, end); None: learned, not scheduled."""

MIN_TEMPERATURE = 0.01
"""The smallest τ: CLIP clamps exp(logit_scale) to at most 100."""


def temperature_at(mode: str, step: int, total_steps: int, *, start: float, end: float) -> float:
    """τ for the optimizer step numbered `step` (0 = the first, `total_steps` − 1 = the last)."""
    schedule = SCHEDULES[mode]
    if schedule is None:
        raise ValueError(f"temperature mode {mode!r} is learned, not scheduled")
    progress = min(1.0, step / max(1, total_steps - 1))
    return schedule(progress, start, end)
