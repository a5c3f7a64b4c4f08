"""Load the model an evaluation runs on: a vlp checkpoint folder or an open_clip model.

    vlp eval --checkpoint runs/x/step-000000400       a vlp checkpoint folder (docs/design.md §3)
    vlp eval --checkpoint runs/x                      the run's latest checkpoint
    vlp eval --checkpoint open_clip:ViT-B-32:/w.pt    an open_clip architecture + local weights
    vlp eval --checkpoint open_clip:ViT-B-32:random   the same, randomly initialised (a baseline)

A vlp checkpoint is rebuilt from its own `model_config.json` (the architecture it was trained
with, not whatever the config file says today) and its `model.safetensors`, read with
safetensors after checking them against the checkpoint's manifest: nothing is unpickled.
`open_clip:MODEL` alone names no weights and is refused rather than evaluated at random. Weights for `open_clip:` are handed to open_clip, which reads
`.safetensors` directly and `.pt`/`.bin` with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from vlp.checkpoint import MODEL_CONFIG, MODEL_WEIGHTS
from vlp.eval.openai_weights import create_open_clip, refuse_pretrained_tag
from vlp.models.loading import open_checkpoint

OPEN_CLIP_PREFIX = "open_clip:"
RANDOM_WEIGHTS = "random"


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
    preprocess_key: str | None = None
    """What the transform is built from (open_clip's final preprocessing config): models with
    equal keys can share one transform object, and with it its decoded images
    (`vlp.eval.cache.decoded_images`); None: share it with none."""
    tokenizer_key: str | None = None
    """What the tokenizer is built from, likewise (its kept tokens, `vlp.eval.cache.tokenize`)."""
    architecture_key: str | None = None
    """What the model is built from, less its weights: models with equal keys compute the same
    features from the same weights (`vlp.eval.cache.keep_text_features`)."""


def load_model(
    spec: str, *, device: str | torch.device = "cpu", verify: bool = True
) -> LoadedModel:
    """Load `spec` (a checkpoint or run folder, or `open_clip:MODEL:WEIGHTS|random`) in eval mode
    on `device`; a checkpoint is first checked against its manifest unless `verify` is False."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        loaded = load_open_clip_model(spec[len(OPEN_CLIP_PREFIX):])
    else:
        opened = open_checkpoint(_checkpoint_folder(spec), verify=verify)
        loaded = LoadedModel(opened.model, opened.preprocess, opened.tokenizer, str(opened.path),
                             None, tokenizer_key=json.dumps(opened.spec.text, sort_keys=True),
                             architecture_key=json.dumps(opened.spec.model_info(), sort_keys=True))
    loaded.model.to(device).eval()
    preprocess_cfg = getattr(getattr(loaded.model, "visual", None), "preprocess_cfg", None)
    if isinstance(preprocess_cfg, dict):
        loaded.preprocess_key = json.dumps(preprocess_cfg, sort_keys=True, default=str)
    return loaded


def _checkpoint_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--checkpoint: {path} is not a folder (a vlp checkpoint folder holds "
            f"{MODEL_CONFIG} and {MODEL_WEIGHTS}; for open_clip models use "
            f"{OPEN_CLIP_PREFIX}MODEL:WEIGHTS)"
        )
    return path


def load_checkpoint_model(
    path: str | Path, *, verify: bool = True
) -> tuple[torch.nn.Module, Callable, Callable]:
    """`(model, preprocess_val, tokenizer)` of a vlp checkpoint (or run) folder
    (`vlp.models.loading`).

    The architecture comes from the folder's `model_config.json` (`{name, model_cfg,
    model_kwargs}`), preprocessing and tokenizer from `preprocess.json`, the weights from
    `model.safetensors` (loaded strictly, so a checkpoint and an architecture that disagree fail
    here rather than evaluate a half-random model). The model is the open_clip model itself.
    """
    loaded = open_checkpoint(_checkpoint_folder(path), verify=verify)
    return loaded.model, loaded.preprocess, loaded.tokenizer


def load_open_clip_model(spec: str) -> LoadedModel:
    """`MODEL:WEIGHTS`: open_clip's architecture MODEL with the local weights file WEIGHTS, or
    randomly initialised for `MODEL:random` (asked for by name, never by leaving WEIGHTS out)."""
    name, _, weights = spec.partition(":")
    if not name:
        raise ValueError(f"--checkpoint: expected {OPEN_CLIP_PREFIX}MODEL:WEIGHTS, got "
                         f"{OPEN_CLIP_PREFIX}{spec}")
    from vlp.models import init_caption_decoder, model_config

    model_config(name)  # registers vlp's own configs; raises a clear error for unknown names
    if not weights:
        raise ValueError(
            f"--checkpoint: {OPEN_CLIP_PREFIX}{name} names no weights; pass a local weights file "
            f"({OPEN_CLIP_PREFIX}{name}:/path/open_clip_model.safetensors) or "
            f"{OPEN_CLIP_PREFIX}{name}:{RANDOM_WEIGHTS} to evaluate a randomly initialised model")
    if weights == RANDOM_WEIGHTS:
        weights = ""
    else:
        refuse_pretrained_tag(name, weights)
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(
            f"--checkpoint: no weights file {weights} (downloads are not attempted; pass a local "
            "file, e.g. open_clip_pytorch_model.bin or open_clip_model.safetensors)"
        )
    # OpenAI's weights are built with QuickGELU, whatever the name says (vlp.eval.openai_weights)
    model, preprocess, recorded_name = create_open_clip(name, weights or None)
    if not weights:
        init_caption_decoder(model)  # a random CoCa's decoder projection is otherwise torch.empty
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name), recorded_name,
                       weights or None, tokenizer_key=f"{OPEN_CLIP_PREFIX}{name}",
                       architecture_key=f"{OPEN_CLIP_PREFIX}{recorded_name}")
