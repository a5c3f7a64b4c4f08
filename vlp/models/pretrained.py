"""Starting weights for a model being built: open_clip files, vlp checkpoints, transformers CLIP.

`model.pretrained` in a recipe names one of them; whatever the source, every weight of the model
must be given (strict loading), and nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torch import nn

from vlp import checkpoint
from vlp.models import HF_PREFIX, ModelSpec
from vlp.models.hf_clip import ConversionError, hidden_act, incompatibilities, read_hf_clip_folder


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load every weight of `model` from `state` or raise a ValueError naming `source`."""
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state:
        state = {**state, "logit_bias": model.logit_bias.detach().clone()}  # keep the init
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source}: weights do not fit the model: {err}") from None


def load_pretrained(model: nn.Module, source: str, *, spec: ModelSpec) -> None:
    """Load starting weights into `model` (built from `spec`) from `source`, never unpickling:

    - `hf:FOLDER`: a transformers `CLIPModel` folder (converted; activations must agree);
    - a folder: a vlp checkpoint, or a run folder (its latest checkpoint), checked against its
      manifest first (a tampered file raises `CheckpointError`);
    - a file: open_clip weights (`.safetensors`, or `.pt`/`.bin` via `torch.load(weights_only=True)`).
    """
    if source.startswith(HF_PREFIX):
        folder = source[len(HF_PREFIX):]
        problems = incompatibilities(spec.model_cfg, {})
        if problems:
            raise ConversionError(f"model.pretrained={source}: model {spec.name!r} is not a "
                                  f"transformers CLIPModel architecture: {'; '.join(problems)}")
        config, state = read_hf_clip_folder(folder)
        theirs = config.get("text_config", {}).get("hidden_act", "quick_gelu")
        if theirs != hidden_act(spec.model_cfg):
            raise ConversionError(
                f"model.pretrained={source}: the folder's hidden_act is {theirs!r} but model "
                f"{spec.name!r} uses {hidden_act(spec.model_cfg)!r}; choose a model with"
                f"{'' if theirs == 'quick_gelu' else 'out'} quick_gelu (e.g. ViT-B-32"
                f"{'-quickgelu' if theirs == 'quick_gelu' else ''})")
        load_state_strict(model, state, source=folder)
    elif Path(source).is_dir():
        ckpt = checkpoint.resolve_checkpoint(source)
        checkpoint.verify_checkpoint(ckpt, model_only=True)
        load_state_strict(model, checkpoint.load_model_weights(ckpt),
                          source=str(ckpt / checkpoint.MODEL_WEIGHTS))
    elif Path(source).is_file():
        try:
            open_clip.load_checkpoint(model, source, strict=True, weights_only=True)
        except Exception as err:  # safetensors, pickle (weights_only) and shape errors alike
            raise ValueError(f"model.pretrained: cannot load {source}: {err}") from None
    else:
        raise FileNotFoundError(f"model.pretrained: no such file or folder {source}")
