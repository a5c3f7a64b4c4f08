"""Load the model an evaluation runs on: a vlp checkpoint folder or an open_clip model.

    vlp eval --checkpoint runs/x/step-000000600       a vlp checkpoint folder (DESIGN §3)
    vlp eval --checkpoint runs/x                      the run's latest checkpoint
    vlp eval --checkpoint open_clip:ViT-B-32:/w.pt    an open_clip architecture + local weights
    vlp eval --checkpoint open_clip:ViT-B-32          the same, randomly initialised

A vlp checkpoint is rebuilt from its own `model_config.json` (the architecture it was trained
with, not whatever the config file says today) and its `model.safetensors`, read with
safetensors: nothing is unpickled. Weights for `open_clip:` are handed to open_clip, which reads
`.safetensors` directly and `.pt`/`.bin` with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from vlp.checkpoint import latest_checkpoint
from vlp.eval.openai_weights import create_open_clip, refuse_pretrained_tag
from vlp.models.loading import open_checkpoint

OPEN_CLIP_PREFIX = "open_clip:"
MODEL_CONFIG_FILE = "model_config.json"


@dataclass
class LoadedModel:
    """A model ready for evaluation, what feeds it, and how results should name it."""

    model: torch.nn.Module
    preprocess: Callable
    """The validation transform (PIL image → tensor)."""
    tokenizer: Callable
    name: str
    """The `model` field of result JSONs: the checkpoint folder or the open_clip name."""
    pretrained: str | None
    """The `pretrained` field of result JSONs: the weights file, None for a random init."""


def load_model(spec: str, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load `spec` (a checkpoint folder or `open_clip:MODEL[:WEIGHTS]`) in eval mode on `device`."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        loaded = load_open_clip_model(spec[len(OPEN_CLIP_PREFIX):])
    else:
        folder = resolve_checkpoint_folder(spec)
        model, preprocess, tokenizer = load_checkpoint_model(folder)
        loaded = LoadedModel(model, preprocess, tokenizer, str(folder), None)
    loaded.model.to(device).eval()
    return loaded


def resolve_checkpoint_folder(path: str | Path) -> Path:
    """`path` itself when it is a checkpoint folder; for a run folder, its latest checkpoint."""
    path = Path(path)
    if path.is_dir() and not (path / MODEL_CONFIG_FILE).exists():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
    return path


def load_checkpoint_model(path: str | Path) -> tuple[torch.nn.Module, Callable, Callable]:
    """`(model, preprocess_val, tokenizer)` of a vlp checkpoint folder (`vlp.models.loading`).

    The architecture comes from the folder's `model_config.json` (`{name, model_cfg,
    model_kwargs}`), preprocessing and tokenizer from `preprocess.json`, the weights from
    `model.safetensors` (loaded strictly, so a checkpoint and an architecture that disagree fail
    here rather than evaluate a half-random model). The model is the open_clip model itself.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--checkpoint: {path} is not a folder (a vlp checkpoint folder holds "
            f"{MODEL_CONFIG_FILE} and model.safetensors; for open_clip models use "
            f"{OPEN_CLIP_PREFIX}MODEL[:WEIGHTS])"
        )
    loaded = open_checkpoint(path)
    return loaded.model, loaded.preprocess, loaded.tokenizer


def load_open_clip_model(spec: str) -> LoadedModel:
    """`MODEL[:WEIGHTS]`: open_clip's architecture MODEL with the local weights file WEIGHTS."""
    name, _, weights = spec.partition(":")
    if not name:
        raise ValueError(f"--checkpoint: expected {OPEN_CLIP_PREFIX}MODEL[:WEIGHTS], got "
                         f"{OPEN_CLIP_PREFIX}{spec}")
    from vlp.models import model_config

    model_config(name)  # registers vlp's own configs; raises a clear error for unknown names
    refuse_pretrained_tag(name, weights)
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(
            f"--checkpoint: no weights file {weights} (downloads are not attempted; pass a local "
            "file, e.g. open_clip_pytorch_model.bin or open_clip_model.safetensors)"
        )
    # OpenAI's weights are built with QuickGELU, whatever the name says (vlp.eval.openai_weights)
    model, preprocess, recorded_name = create_open_clip(name, weights or None)
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name), recorded_name,
                       weights or None)
