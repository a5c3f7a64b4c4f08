"""open_clip CLIP ↔ transformers `CLIPModel`: configs and weights, both ways.

Only the original CLIP architecture maps: a ViT image tower pooling its class token and the
causal text transformer pooling its end-of-text token, both with linear projections and no
extras. `incompatibilities(model_cfg, model_kwargs)` lists, by config key, everything else.
Weights are renamed and the fused attention projections split (`in_proj` → q/k/v); projection
matrices are transposed (open_clip multiplies `x @ proj`, transformers' `nn.Linear` `x @ Wᵀ`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

CLIP_VOCAB_SIZE = 49408
BOS_TOKEN_ID, EOS_TOKEN_ID = 49406, 49407


class ConversionError(ValueError):
    """A model (or folder) cannot be converted between open_clip and transformers CLIP."""


# Settings with a transformers CLIPModel equivalent only at these values (open_clip defaults).
_VISION_FIXED: dict[str, Any] = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
    "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "timm_model_name": None,
}
_TEXT_FIXED: dict[str, Any] = {
    "hf_model_name": None, "hf_tokenizer_name": None, "ls_init_value": None, "embed_cls": False,
    "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax",
    "proj_bias": False, "proj_type": "linear", "act_kwargs": None, "norm_kwargs": None,
    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    "vocab_size": CLIP_VOCAB_SIZE, "tokenizer_kwargs": None, "tokenizer_mode": None,
}
_WHY: dict[str, str] = {
    "multimodal_cfg": "a CoCa caption decoder has no place in CLIPModel",
    "custom_text": "custom text towers are not the CLIP text transformer",
    "text_cfg.hf_model_name": "a transformers text tower is not the CLIP text transformer",
    "text_cfg.hf_tokenizer_name": "CLIPModel's tokenizer is CLIP's BPE",
    "text_cfg.vocab_size": "CLIPModel's tokenizer is CLIP's BPE with 49408 tokens",
    "vision_cfg.timm_model_name": "a timm image tower is not the CLIP ViT",
    "vision_cfg.layers": "a tuple of layers is a ResNet, not a ViT",
    "model_kwargs.init_logit_bias": "CLIPModel has no logit bias (SigLIP-style sigmoid loss)",
}


def incompatibilities(model_cfg: dict[str, Any], model_kwargs: dict[str, Any]) -> list[str]:
    """Why an open_clip architecture cannot become a transformers CLIPModel (empty if it can)."""
    problems = []
    for key in ("multimodal_cfg",):
        if key in model_cfg:
            problems.append(key)
    if model_cfg.get("custom_text"):
        problems.append("custom_text")
    if model_kwargs.get("init_logit_bias") is not None:
        problems.append("model_kwargs.init_logit_bias")
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if not isinstance(vision.get("layers", 12), int):
        problems.append("vision_cfg.layers")
    for section, fixed, cfg in (("vision_cfg", _VISION_FIXED, vision),
                                ("text_cfg", _TEXT_FIXED, text)):
        for key, value in fixed.items():
            if key in cfg and cfg[key] != value and not (key == "block_type"
                                                         and cfg[key] == "default"):
                problems.append(f"{section}.{key}")
    if "text_cfg.hf_model_name" in problems and "text_cfg.hf_tokenizer_name" in problems:
        problems.remove("text_cfg.hf_tokenizer_name")  # the same transformers tower
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        problems.append("vision_cfg.image_size")
    return [f"{p}={_value(p, model_cfg, model_kwargs)!r} ({_WHY.get(p, 'not supported')})"
            for p in problems]


def _value(path: str, model_cfg: dict[str, Any], model_kwargs: dict[str, Any]) -> Any:
    node: Any = {**model_cfg, "model_kwargs": model_kwargs}
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "<section>" if isinstance(node, dict) else node


def hidden_act(model_cfg: dict[str, Any]) -> str:
    """transformers' name for the activation open_clip uses: `quick_gelu` (x·σ(1.702x), OpenAI's
    CLIP) when `quick_gelu` is set, else exact `gelu` (open_clip's `nn.GELU`)."""
    return "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"


def clip_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The `CLIPConfig` (as a dict) of an open_clip CLIP architecture."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = hidden_act(model_cfg)
    size = vision.get("image_size", 224)
    width_v, width_t = vision.get("width", 768), text.get("width", 512)
    return {
        "projection_dim": model_cfg["embed_dim"],
        "vision_config": {
            "hidden_size": width_v,
            "intermediate_size": int(width_v * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision.get("layers", 12),
            "num_attention_heads": width_v // vision.get("head_width", 64),
            "image_size": size[0] if isinstance(size, (list, tuple)) else size,
            "patch_size": vision.get("patch_size", 16),
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": model_cfg["embed_dim"],
        },
        "text_config": {
            "vocab_size": text.get("vocab_size", CLIP_VOCAB_SIZE),
            "hidden_size": width_t,
            "intermediate_size": int(width_t * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77),
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": model_cfg["embed_dim"],
            "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": 0,
        },
    }


def open_clip_cfg_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    """The open_clip `model_cfg` of a transformers CLIPConfig (dict), inverse of `clip_config`."""
    vision, text = config["vision_config"], config["text_config"]
    acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ConversionError(f"hidden_act {sorted(acts)}: open_clip supports one activation, "
                              "gelu or quick_gelu, shared by both towers")
    cfg = {
        "embed_dim": config.get("projection_dim", 512),
        "vision_cfg": {
            "image_size": vision.get("image_size", 224),
            "layers": vision.get("num_hidden_layers", 12),
            "width": vision.get("hidden_size", 768),
            "head_width": vision.get("hidden_size", 768) // vision.get("num_attention_heads", 12),
            "mlp_ratio": vision.get("intermediate_size", 3072) / vision.get("hidden_size", 768),
            "patch_size": vision.get("patch_size", 32),
        },
        "text_cfg": {
            "context_length": text.get("max_position_embeddings", 77),
            "vocab_size": text.get("vocab_size", CLIP_VOCAB_SIZE),
            "width": text.get("hidden_size", 512),
            "heads": text.get("num_attention_heads", 8),
            "layers": text.get("num_hidden_layers", 12),
            "mlp_ratio": text.get("intermediate_size", 2048) / text.get("hidden_size", 512),
        },
    }
    if acts == {"quick_gelu"}:
        cfg["quick_gelu"] = True
    return cfg


# ------------------------------------------------------------------------------ weights

_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOP = {  # open_clip key → (transformers key, transpose)
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
    "ln_final.weight": ("text_model.final_layer_norm.weight", False),
    "ln_final.bias": ("text_model.final_layer_norm.bias", False),
    "text_projection": ("text_projection.weight", True),
    "logit_scale": ("logit_scale", False),
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
    "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", False),
    "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", False),
    "visual.ln_post.weight": ("vision_model.post_layernorm.weight", False),
    "visual.ln_post.bias": ("vision_model.post_layernorm.bias", False),
    "visual.proj": ("visual_projection.weight", True),
}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")
_HF_BLOCK_KEY = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP weights → transformers CLIPModel weights (every key used exactly once)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _TOP:
            name, transpose = _TOP[key]
            out[name] = value.t().contiguous() if transpose else value
            continue
        match = _BLOCK_KEY.match(key)
        if match is None:
            raise ConversionError(f"weight {key!r} has no counterpart in transformers CLIPModel")
        visual, index, module, kind = match.groups()
        prefix = f"{'vision' if visual else 'text'}_model.encoder.layers.{index}."
        if module == "attn.in_proj":
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
        elif module in _BLOCK:
            out[f"{prefix}{_BLOCK[module]}.{kind}"] = value
        else:
            raise ConversionError(f"weight {key!r} has no counterpart in transformers CLIPModel")
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPModel weights → open_clip CLIP weights (inverse of `to_hf_state_dict`)."""
    top = {hf: (oc, transpose) for oc, (hf, transpose) in _TOP.items()}
    block = {hf: oc for oc, hf in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer older transformers versions saved
        if key in top:
            name, transpose = top[key]
            out[name] = value.t().contiguous() if transpose else value
            continue
        match = _HF_BLOCK_KEY.match(key)
        if match is None:
            raise ConversionError(f"weight {key!r} has no counterpart in an open_clip CLIP")
        tower, index, module, kind = match.groups()
        prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{index}."
        qkv_match = re.fullmatch(r"self_attn\.([qkv])_proj", module)
        if qkv_match:
            qkv.setdefault((prefix, kind), {})[qkv_match.group(1)] = value
        elif module in block:
            out[f"{prefix}{block[module]}.{kind}"] = value
        else:
            raise ConversionError(f"weight {key!r} has no counterpart in an open_clip CLIP")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConversionError(f"{prefix}: attention {kind} lacks one of q/k/v projections")
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def read_hf_clip_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(config, open_clip weights)` of a transformers CLIPModel folder, without unpickling:
    `model.safetensors`, else `pytorch_model.bin` read with `torch.load(weights_only=True)`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: not a transformers CLIP folder (no config.json)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "clip":
        raise ConversionError(f"{config_path}: model_type {config.get('model_type')!r}, "
                              "expected 'clip' (a transformers CLIPModel)")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        weights = folder / "pytorch_model.bin"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded "
                                "checkpoints are not supported)")
    try:
        if weights.suffix == ".safetensors":
            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and (weights-only) unpickling errors alike
        raise ConversionError(f"{weights}: not a readable weights file ({err})") from None
    return config, from_hf_state_dict(state)
