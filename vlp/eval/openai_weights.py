"""Build the activation a weights file was trained with: OpenAI's CLIP weights need QuickGELU.

OpenAI trained CLIP with QuickGELU (`x * sigmoid(1.702 x)`); open_clip's plain names
(`ViT-B-32`) build `nn.GELU`, and only the `-quickgelu` names (`ViT-B-32-quickgelu`) match
OpenAI's weights. Loaded into the wrong activation the weights still load (no key differs), but
every number drifts from the published ones. So before `open_clip:MODEL:WEIGHTS` is built, the
file's provenance is read, in this order:

1. an `open_clip_config.json` beside the file (the Hugging Face hub layout open_clip writes,
   e.g. `timm/vit_base_patch32_clip_224.openai`): its `model_cfg.quick_gelu` decides;
2. a TorchScript archive (`ViT-B-32.pt` as OpenAI released it): OpenAI's format;
3. `openai` in the file's name or a folder above it (`vit-b-32-openai.bin`, the hub cache's
   `models--timm--vit_base_patch32_clip_224.openai/...`): OpenAI's weights.

Weights that need QuickGELU are built with it (the result names the model `MODEL-quickgelu`);
a `-quickgelu` name with weights whose config says GELU is refused with one line. Files with no
provenance are built as named.
"""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

HUB_CONFIG_FILE = "open_clip_config.json"
_OPENAI_BUFFERS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class Provenance:
    """What a weights file says about its activation."""

    quick_gelu: bool
    reason: str
    """Where that came from, for messages: `open_clip_config.json says quick_gelu: true`, ..."""


def weights_provenance(weights: str | Path) -> Provenance | None:
    """The activation `weights` was trained with, when its provenance tells; None otherwise."""
    weights = Path(weights)
    config = weights.parent / HUB_CONFIG_FILE
    if config.is_file():
        try:
            model_cfg = json.loads(config.read_text()).get("model_cfg", {})
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"--checkpoint: {config} is not an open_clip config ({err})") from None
        if isinstance(model_cfg, dict) and "quick_gelu" in model_cfg:
            value = bool(model_cfg["quick_gelu"])
            return Provenance(value, f"{config} says quick_gelu: {str(value).lower()}")
    if is_torchscript_archive(weights):
        return Provenance(True, "it is a TorchScript archive, the format of OpenAI's CLIP release")
    for part in (weights.name, *(p.name for p in weights.parents)):
        if "openai" in part.lower():
            return Provenance(True, f"its path names OpenAI ({part!r})")
    return None


def is_torchscript_archive(path: Path) -> bool:
    """A zip whose entries hold TorchScript code (`<name>/code/...`), as `torch.jit.save` writes."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def refuse_pretrained_tag(name: str, weights: str) -> None:
    """One line for `open_clip:ViT-B-32:openai`: a tag, not a file, and nothing is downloaded."""
    tag = open_clip.get_pretrained_cfg(name, weights) if weights else {}
    if tag and not Path(weights).exists():
        hint = f"; vlp builds {name} with QuickGELU for them" if tag.get("quick_gelu") else ""
        raise ValueError(
            f"--checkpoint: {weights!r} is open_clip's pretrained tag for {name}; downloads are "
            f"not attempted: pass the downloaded weights file instead{hint}"
        )


def create_open_clip(name: str, weights: str | None) -> tuple[torch.nn.Module, Callable, str]:
    """`(model, preprocess_val, recorded_name)` of open_clip's `name` with local `weights`, built
    with the activation the weights were trained with (see the module docstring)."""
    provenance = weights_provenance(weights) if weights and Path(weights).is_file() else None
    named_quick_gelu = bool(open_clip.get_model_config(name).get("quick_gelu", False))
    quick_gelu = named_quick_gelu
    if provenance is not None and provenance.quick_gelu != named_quick_gelu:
        if not provenance.quick_gelu:
            raise ValueError(
                f"--checkpoint: {name} builds QuickGELU but {weights} was trained with GELU "
                f"({provenance.reason}); name the architecture without -quickgelu"
            )
        quick_gelu = True
        print(f"vlp eval: {weights} needs QuickGELU ({provenance.reason}): building {name} "
              "with QuickGELU", file=sys.stderr)
    recorded = name if quick_gelu == named_quick_gelu else _quick_gelu_name(name)
    torchscript = weights is not None and provenance is not None and is_torchscript_archive(
        Path(weights))
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=None if torchscript else (weights or None), force_quick_gelu=quick_gelu
    )
    if torchscript:
        state = torchscript_state_dict(Path(weights))
        for key in _non_persistent_buffers(model):  # a TorchScript archive saves those too
            state.pop(key, None)
        model.load_state_dict(state, strict=True)
    return model, preprocess, recorded


def torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights of OpenAI's TorchScript release, under open_clip's names (OpenAI's CLIP and
    open_clip's `CLIP` share them; the three integer buffers OpenAI adds are dropped, as
    `open_clip.load_openai_model` does). The archive is read by `torch.jit.load`, which runs no
    Python code from it."""
    archive = torch.jit.load(str(path), map_location="cpu")
    state = {k: v for k, v in archive.state_dict().items() if k not in _OPENAI_BUFFERS}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _non_persistent_buffers(model: torch.nn.Module) -> list[str]:
    return [f"{prefix}.{name}".lstrip(".") for prefix, module in model.named_modules()
            for name in module._non_persistent_buffers_set]


def _quick_gelu_name(name: str) -> str:
    """open_clip's name for `name` built with QuickGELU, when it has one."""
    candidate = f"{name}-quickgelu"
    return candidate if candidate in open_clip.list_models() else f"{name} (QuickGELU)"
