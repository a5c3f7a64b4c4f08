"""Locked towers (LiT, "Locked-image Tuning", arXiv:2111.07991): freeze all or part of a tower.

Locking uses open_clip's own `lock_image_tower`/`lock_text_tower`, except for transformers text
towers, whose layers open_clip can only unlock for a few architectures (see `hf_text`). A fully
locked tower also stays in eval mode while the rest trains: no dropout, no patch dropout, frozen
norm statistics, so it gives the same embedding for the same input at every step, as LiT's
precomputed embeddings would.
"""

from __future__ import annotations

from typing import Any

from open_clip.hf_model import HFTextEncoder
from torch import nn

from vlp.models.hf_text import lock_hf_text


def _stay_in_eval_mode(module: nn.Module, args: Any) -> None:
    if module.training:
        module.eval()


def keep_in_eval_mode(module: nn.Module) -> None:
    """Put `module` back in eval mode before each of its forwards, whatever `.train()` said."""
    module.eval()
    module.register_forward_pre_hook(_stay_in_eval_mode)


def lock_towers(
    model: nn.Module,
    *,
    image: bool = False,
    image_unlocked_groups: int = 0,
    text: bool = False,
    text_unlocked_layers: int = 0,
) -> None:
    """Freeze the image and/or text tower of an open_clip model in place.

    `image_unlocked_groups` counts open_clip's layer groups from the top (the last group is the
    projection); `text_unlocked_layers` counts transformer layers from the top. 0 = fully locked.
    """
    if image:
        model.lock_image_tower(unlocked_groups=image_unlocked_groups)
        if image_unlocked_groups == 0:
            keep_in_eval_mode(model.visual)
    if text:
        tower = getattr(model, "text", None)
        if isinstance(tower, HFTextEncoder):
            lock_hf_text(tower, unlocked_layers=text_unlocked_layers)
            if text_unlocked_layers == 0:
                keep_in_eval_mode(tower.transformer)
        else:
            model.lock_text_tower(unlocked_layers=text_unlocked_layers)
            if text_unlocked_layers == 0 and tower is not None:
                keep_in_eval_mode(tower)
