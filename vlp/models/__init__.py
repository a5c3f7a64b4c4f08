"""Dual encoders built through open_clip, from a model name or one of vlp's own JSON configs.

vlp's configs (`vlp/models/configs/NAME.json`) are in open_clip's format and are registered with
open_clip when first asked for, so a vlp model is an ordinary open_clip model: same forward,
same `encode_image`/`encode_text`, same tokenizer and transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"
VLP_MODELS: tuple[str, ...] = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


class DualEncoder(nn.Module):
    """One forward for everything a step needs, so DDP sees every tower call.

    Wraps an open_clip model and returns its output dict (DESIGN §3: `image_features`,
    `text_features`, `logit_scale`, optional `logit_bias`, `logits`, `labels`), plus
    `neg_text_features` (b, K, D), normalised, when hard-negative captions (b, K, L) are given.
    Checkpoints hold the wrapped open_clip model's weights (`.model`), not this wrapper's.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, neg_text: torch.Tensor | None = None
    ) -> dict[str, Any]:
        output = self.model(image, text)
        if neg_text is not None:
            b, k, length = neg_text.shape
            neg = self.model.encode_text(neg_text.reshape(b * k, length), normalize=True)
            output["neg_text_features"] = neg.reshape(b, k, -1)
        return output


@dataclass
class ModelBundle:
    """A model with the callables that feed it."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable


def list_models() -> list[str]:
    """Every name `build_model` accepts: vlp's configs first, then open_clip's."""
    return list(VLP_MODELS) + [m for m in open_clip.list_models() if m not in VLP_MODELS]


def _register(name: str) -> None:
    if name in VLP_MODELS and name not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR / f"{name}.json")


def model_config(name: str) -> dict:
    """The open_clip architecture config of `name` (embed_dim, vision_cfg, text_cfg, ...)."""
    _register(name)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"model.name: unknown model {name!r}; vlp models: {list(VLP_MODELS)}, "
                         "or any name from open_clip.list_models()")
    return cfg


def build_model(
    name: str,
    *,
    pretrained: str | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
) -> ModelBundle:
    """Build model, train/val transforms and tokenizer; `pretrained` is a local weights file."""
    model_config(name)  # validates the name with a clear error
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"model.pretrained: no such weights file {pretrained}")
    overrides = {"init_logit_scale": init_logit_scale, "init_logit_bias": init_logit_bias}
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, output_dict=True,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    return ModelBundle(model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name))
