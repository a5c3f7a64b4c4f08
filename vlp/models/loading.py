"""Rebuild a model from a vlp checkpoint folder: what `vlp.load`, `vlp eval` and `vlp export` use.

The architecture comes from the checkpoint's own `model_config.json` (not whatever the config
file says today), preprocessing and tokenizer from `preprocess.json` (older checkpoints without
it get open_clip's defaults for the architecture), a transformers text tower's config and
tokenizer from `text_tower/`, and the weights from `model.safetensors`, read with safetensors:
nothing is unpickled. Those files are first checked against the checkpoint's `manifest.json`
(`verify=False` skips that), so a truncated or tampered file raises `CheckpointError`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp import checkpoint
from vlp.checkpoint import MODEL_CONFIG, MODEL_WEIGHTS, CheckpointError
from vlp.models import (
    TEXT_TOWER_DIR,
    ModelSpec,
    build_tokenizer,
    create_model,
    default_preprocess_cfg,
    text_spec,
)

PREPROCESS_FILE = "preprocess.json"


class Encoder(nn.Module):
    """A loaded dual encoder: `encode_image`/`encode_text` return L2-normalised embeddings.

    A thin wrapper around the open_clip model (`.model`) whose encoders default to
    `normalize=True`, so that `image_emb @ text_emb.T` is a cosine similarity. The rest of the
    open_clip model (`logit_scale`, `forward`, towers) is reached through `.model`.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images → (B, D) embeddings."""
        return self.model.encode_image(image, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, L) token ids from the loaded tokenizer → (B, D) embeddings."""
        return self.model.encode_text(text, normalize=normalize)

    def forward(self, image: torch.Tensor | None = None,
                text: torch.Tensor | None = None) -> Any:
        return self.model(image, text)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def embed_dim(self) -> int:
        return int(self.spec.model_cfg["embed_dim"])


@dataclass
class LoadedCheckpoint:
    """An open_clip model rebuilt from a checkpoint, with what feeds it and where it came from."""

    model: nn.Module
    preprocess: Callable
    """The validation transform (PIL image → tensor)."""
    tokenizer: Callable
    spec: ModelSpec
    path: Path
    """The checkpoint folder (a run folder resolves to its latest checkpoint)."""


def read_spec(ckpt: Path) -> ModelSpec:
    """The `ModelSpec` a checkpoint folder describes, with its `text_tower/` paths filled in."""
    info_path = ckpt / MODEL_CONFIG
    info = checkpoint.read_json(info_path)
    if not isinstance(info, dict):
        raise CheckpointError(f"{info_path}: expected a JSON object")
    for key, kind in (("name", str), ("model_cfg", dict)):
        if not isinstance(info.get(key), kind):
            raise CheckpointError(f"{info_path}: {key!r} missing or not a {kind.__name__}")
    if not isinstance(info.get("model_kwargs", {}), dict):
        raise CheckpointError(f"{info_path}: 'model_kwargs' must be a mapping")
    name, model_cfg = info["name"], copy.deepcopy(info["model_cfg"])

    tower = None
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        tower = ckpt / TEXT_TOWER_DIR
        if not (tower / "config.json").is_file():
            raise CheckpointError(f"checkpoint file missing: {tower / 'config.json'} (the "
                                  "transformers text tower's config and tokenizer files)")
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(tower)

    preprocess_path = ckpt / PREPROCESS_FILE
    if preprocess_path.is_file():
        preprocess = checkpoint.read_json(preprocess_path)
        if not isinstance(preprocess, dict) or not isinstance(preprocess.get("image"), dict) \
                or not isinstance(preprocess.get("text"), dict):
            raise CheckpointError(f"{preprocess_path}: expected {{'image': {{...}}, "
                                  "'text': {...}}")
        image, text = preprocess["image"], dict(preprocess["text"])
        if text.get("type") == "hf":
            text["folder"] = str(ckpt / text.get("folder", TEXT_TOWER_DIR))
    else:  # written before preprocess.json existed
        image, text = default_preprocess_cfg(model_cfg), text_spec(name, model_cfg)
    return ModelSpec(name, model_cfg, info.get("model_kwargs", {}), image, text, tower)


def open_checkpoint(path: str | Path, *, verify: bool = True) -> LoadedCheckpoint:
    """Rebuild the open_clip model of a checkpoint folder (or a run folder's latest checkpoint),
    with its weights loaded strictly, on CPU and in eval mode; with `verify`, only after the
    files it reads match the checkpoint's manifest."""
    ckpt = checkpoint.resolve_checkpoint(path)
    if verify:
        checkpoint.verify_checkpoint(ckpt, model_only=True)
    spec = read_spec(ckpt)
    try:
        model, _, preprocess = create_model(spec)
        tokenizer = build_tokenizer(spec.text)
    except (OSError, TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{ckpt / MODEL_CONFIG}: cannot build the model it describes "
                              f"({type(err).__name__}: {err})") from None
    weights = checkpoint.load_model_weights(ckpt)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt / MODEL_WEIGHTS} does not fit the architecture in "
                              f"{ckpt / MODEL_CONFIG}: {err}") from None
    return LoadedCheckpoint(model.eval(), preprocess, tokenizer, spec, ckpt)


def load(
    path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[Encoder, Callable, Callable]:
    """`model, preprocess, tokenizer` of a vlp checkpoint (or run) folder; see `vlp.load`."""
    loaded = open_checkpoint(path, verify=verify)
    model = Encoder(loaded.model, loaded.spec).to(device).eval()
    return model, loaded.preprocess, loaded.tokenizer
