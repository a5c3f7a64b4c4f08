"""Dual encoders built through open_clip, from a model name or one of vlp's own JSON configs.

vlp's configs (`vlp/models/configs/NAME.json`) are in open_clip's format and are registered with
open_clip when first asked for, so a vlp model is an ordinary open_clip model: same forward,
same `encode_image`/`encode_text`, same tokenizer and transforms.

A `ModelSpec` is everything needed to rebuild a model without the recipe: the open_clip
architecture (`model_cfg`), constructor overrides, the image preprocessing and the tokenizer.
Checkpoints store it (`model_config.json`, `preprocess.json`, `text_tower/`), and `vlp.load`,
the eval suite and `vlp export` rebuild models from it. The text tower may be any transformers
encoder in a local folder (`hf_text_model`, see `vlp.models.hf_text`).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg
from torch import nn

from vlp.config import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"
VLP_MODELS: tuple[str, ...] = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
HF_PREFIX = "hf:"
TEXT_TOWER_DIR = "text_tower"
"""Checkpoint subfolder with a transformers text tower's config and tokenizer files."""


class DualEncoder(nn.Module):
    """One forward for everything a step needs, so DDP sees every tower call.

    Wraps an open_clip model and returns its output dict (docs/design.md §3: `image_features`,
    `text_features`, `logit_scale`, optional `logit_bias`, `logits`, `labels`), plus
    `neg_text_features` (b, K, D), normalised, when hard-negative captions (b, K, L) are given,
    and `pos_text_features` (b, K, D), normalised, when positive captions (b, K, L) are given
    (data.captions: all; the first, the `text` caption, is encoded again there).
    Checkpoints hold the wrapped open_clip model's weights (`.model`), not this wrapper's.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, neg_text: torch.Tensor | None = None,
        pos_text: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        output = self.model(image, text)
        for name, captions in (("neg_text_features", neg_text), ("pos_text_features", pos_text)):
            if captions is not None:
                b, k, length = captions.shape
                encoded = self.model.encode_text(captions.reshape(b * k, length), normalize=True)
                output[name] = encoded.reshape(b, k, -1)
        return output


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and feed it, without the recipe (JSON-able)."""

    name: str
    """The model name it was built from (`vlp-tiny`, `ViT-B-32`, ...); informative only."""
    model_cfg: dict[str, Any]
    """The open_clip architecture (`embed_dim`, `vision_cfg`, `text_cfg`, ...)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor overrides on top of `model_cfg` (`init_logit_scale`, `init_logit_bias`)."""
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    """Image preprocessing: open_clip `PreprocessCfg` fields (size, mean, std, interpolation,
    resize_mode, ...)."""
    text: dict[str, Any] = field(default_factory=dict)
    """Tokenizer: `{type: clip_bpe | hf | open_clip, context_length, ...}` (see `build_tokenizer`)."""
    text_tower: Path | None = None
    """Folder of a transformers text tower (its config and tokenizer files), if any."""

    def model_info(self) -> dict[str, Any]:
        """The content of a checkpoint's `model_config.json`."""
        return {"name": self.name, "model_cfg": self.model_cfg, "model_kwargs": self.model_kwargs}

    def checkpoint_files(self) -> dict[str, Any]:
        """Files a checkpoint holds besides weights and `model_config.json`: `preprocess.json`
        and, for a transformers text tower, `text_tower/` (config and tokenizer, no weights)."""
        from vlp.models.hf_text import tokenizer_files

        text = dict(self.text)
        files: dict[str, Any] = {}
        if self.text_tower is not None:
            text["folder"] = TEXT_TOWER_DIR
            files = {f"{TEXT_TOWER_DIR}/{p.name}": p for p in tokenizer_files(self.text_tower)}
        return {"preprocess.json": {"image": self.preprocess_cfg, "text": text}, **files}


@dataclass
class ModelBundle:
    """A model with the callables that feed it."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    spec: ModelSpec | None = None


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


def default_preprocess_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's preprocessing for an architecture with no pretrained tag: its defaults (OpenAI
    mean/std, bicubic, resize the shortest side, centre crop) at the image tower's size."""
    cfg = asdict(PreprocessCfg())
    size = model_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    cfg["size"] = list(size) if isinstance(size, (list, tuple)) else [size, size]
    return json.loads(json.dumps(cfg))  # tuples → lists, as they come back from JSON


def is_vit(model_cfg: dict[str, Any]) -> bool:
    """Whether the image tower of an architecture is open_clip's own VisionTransformer (not a
    ModifiedResNet, whose `layers` is a list, nor a timm model)."""
    vision = model_cfg.get("vision_cfg", {})
    return isinstance(vision.get("layers", 12), int) and not vision.get("timm_model_name")


def text_spec(name: str, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """How `name`'s text is tokenized: CLIP's BPE (`clip_bpe`), a transformers tokenizer in a
    local folder (`hf`), or whatever open_clip picks by model name (`open_clip`: SigLIP, ...)."""
    text = model_cfg.get("text_cfg", {})
    spec: dict[str, Any] = {"context_length": text.get("context_length", 77)}
    hf_tokenizer = text.get("hf_tokenizer_name")
    if hf_tokenizer and Path(hf_tokenizer).is_dir():
        return {"type": "hf", **spec, "folder": str(hf_tokenizer)}
    if hf_tokenizer or "siglip" in name.lower():
        return {"type": "open_clip", **spec, "name": name}
    return {"type": "clip_bpe", **spec, "kwargs": text.get("tokenizer_kwargs") or {}}


def build_tokenizer(spec: dict[str, Any]) -> Callable:
    """The tokenizer a `text_spec` describes."""
    context_length = spec["context_length"]
    kind = spec.get("type")
    if kind == "clip_bpe":
        return open_clip.SimpleTokenizer(context_length=context_length, **spec.get("kwargs", {}))
    if kind == "hf":
        from vlp.models.hf_text import build_hf_tokenizer

        return build_hf_tokenizer(spec["folder"], context_length=context_length)
    if kind == "open_clip":
        _register(spec["name"])
        return open_clip.get_tokenizer(spec["name"], context_length=context_length)
    raise ValueError(f"unknown tokenizer type {kind!r}; known: clip_bpe, hf, open_clip")


def model_spec(
    name: str,
    *,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    hf_text_model: str | None = None,
    hf_text_pooler: str = "mean",
    hf_text_proj: str = "none",
    patch_dropout: float = 0.0,
) -> ModelSpec:
    """The spec of model `name`, its text tower replaced by the transformers encoder in
    `hf_text_model` (a folder or `pkg:MODULE/SUBDIR`) if given, and its ViT image tower dropping
    that share of patches in training (`patch_dropout` > 0: FLIP, open_clip's
    `vision_cfg.patch_dropout`)."""
    model_cfg = copy.deepcopy(model_config(name))
    if patch_dropout:
        if not is_vit(model_cfg):
            raise ValueError(f"model.patch_dropout: {name!r} has no ViT image tower (patch "
                             "dropout drops ViT patch tokens); use a ViT, e.g. vlp-tiny, or 0")
        model_cfg["vision_cfg"]["patch_dropout"] = patch_dropout
    text_tower = None
    if hf_text_model is not None:
        from vlp.models.hf_text import hf_text_cfg, resolve_folder

        if "multimodal_cfg" in model_cfg:
            raise ValueError(f"model.hf_text_model: {name!r} is a captioning (CoCa) model, whose "
                             "decoder needs its own CLIP text tower and tokenizer")
        text_tower = resolve_folder(hf_text_model)
        context_length = model_cfg["text_cfg"].get("context_length", 77)
        model_cfg["text_cfg"], model_cfg["embed_dim"] = hf_text_cfg(
            text_tower, pooler=hf_text_pooler, proj=hf_text_proj,
            embed_dim=model_cfg["embed_dim"], context_length=context_length)
        model_cfg.pop("custom_text", None)  # implied by a transformers text tower
    overrides = {"init_logit_scale": init_logit_scale, "init_logit_bias": init_logit_bias}
    return ModelSpec(name, model_cfg, {k: v for k, v in overrides.items() if v is not None},
                     default_preprocess_cfg(model_cfg), text_spec(name, model_cfg), text_tower)


def create_model(
    spec: ModelSpec, *, load_text_weights: bool = False
) -> tuple[nn.Module, Callable, Callable]:
    """`(model, preprocess_train, preprocess_val)` of `spec`, randomly initialised, except a
    transformers text tower, which gets its pretrained weights when `load_text_weights`.

    Built by open_clip from a throwaway `local-dir:` folder holding only the config, so any
    architecture open_clip knows (CLIP, CoCa, transformers text towers) is built its own way
    and nothing is added to open_clip's name registry.
    """
    config = {"model_cfg": spec.model_cfg, "preprocess_cfg": spec.preprocess_cfg}
    image = spec.preprocess_cfg
    hf_folder = spec.model_cfg.get("text_cfg", {}).get("hf_model_name")
    if hf_folder and (Path(hf_folder) / "config.json").is_file():
        from vlp.models.hf_text import read_hf_config, register_architecture

        register_architecture(read_hf_config(Path(hf_folder)))
    with tempfile.TemporaryDirectory(prefix="vlp-model-") as folder, _no_weights_warnings():
        (Path(folder) / "open_clip_config.json").write_text(json.dumps(config))
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            f"local-dir:{folder}", load_weights=False, pretrained_text=load_text_weights,
            output_dict=True,
            # also passed here so that they stay tuples, as open_clip's own configs give them
            image_mean=tuple(image["mean"]) if "mean" in image else None,
            image_std=tuple(image["std"]) if "std" in image else None,
            **spec.model_kwargs,
        )
    init_caption_decoder(model)
    return model, preprocess_train, preprocess_val


def init_caption_decoder(model: nn.Module) -> None:
    """Initialise the one weight open_clip leaves uninitialised in a CoCa caption decoder.

    open_clip's `MultimodalTransformer` creates `text_projection` (width × vocabulary) with
    `torch.empty` and never initialises it: its `init_parameters` is not called (and fails if
    called: it reads a `.transformer` the class does not have). The projection then holds
    whatever the allocator returns: zeros from fresh pages, or stale bytes, NaN among them, where
    freed memory is reused (as later in a long process), which made the caption loss NaN at
    step 1. It gets the normal(0, width^-0.5) that `init_parameters` intends; the decoder's other
    weights keep PyTorch's default initialisation, as in open_clip's CoCa training.
    """
    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if isinstance(projection, nn.Parameter):
        with torch.no_grad():
            nn.init.normal_(projection, std=projection.shape[0] ** -0.5)


@contextmanager
def _no_weights_warnings() -> Iterator[None]:
    """Hide open_clip's "no weights loaded" warnings: weights, if any, are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("no CLIP weights found" in message or "No pretrained weights" in message
                    or "initialized partially" in message)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def build_model(cfg: ModelConfig | str, **fields: Any) -> ModelBundle:
    """Build model, train/val transforms and tokenizer from the `model` slice of a run config
    (see `model_spec` and `load_pretrained`), then lock towers as asked (`vlp.models.locking`).

    `build_model("vlp-tiny", init_logit_bias=-10.0)` is short for
    `build_model(ModelConfig("vlp-tiny", init_logit_bias=-10.0))`.
    """
    from vlp.models.locking import lock_towers
    from vlp.models.pretrained import load_pretrained

    if isinstance(cfg, str):
        cfg = ModelConfig(cfg, **fields)
    elif fields:
        raise TypeError("build_model: give a ModelConfig or a name with keyword fields, not both")
    spec = model_spec(cfg.name, init_logit_scale=cfg.init_logit_scale,
                      init_logit_bias=cfg.init_logit_bias, hf_text_model=cfg.hf_text_model,
                      hf_text_pooler=cfg.hf_text_pooler, hf_text_proj=cfg.hf_text_proj,
                      patch_dropout=cfg.patch_dropout)
    pretrained = cfg.pretrained
    if pretrained is not None and not pretrained.startswith(HF_PREFIX) \
            and not Path(pretrained).exists():
        raise FileNotFoundError(f"model.pretrained: no such weights file {pretrained}")
    model, preprocess_train, preprocess_val = create_model(spec, load_text_weights=True)
    if pretrained is not None:
        load_pretrained(model, pretrained, spec=spec)
    lock_towers(model, image=cfg.lock_image, image_unlocked_groups=cfg.lock_image_unlocked_groups,
                text=cfg.lock_text, text_unlocked_layers=cfg.lock_text_unlocked_layers)
    return ModelBundle(model, preprocess_train, preprocess_val, build_tokenizer(spec.text), spec)
