"""Checkpoint folders for tests: what training writes, minus the optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlp.checkpoint import write_manifest
from vlp.models import build_model, model_config


def write_random_checkpoint(folder: Path, name: str = "vlp-tiny", *, seed: int = 0) -> Path:
    """`folder` holding a randomly initialised `name`: weights, model_config.json, manifest.json."""
    torch.manual_seed(seed)
    model = build_model(name).model
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors")
    (folder / "model_config.json").write_text(json.dumps(
        {"name": name, "model_cfg": model_config(name), "model_kwargs": {}}))
    write_manifest(folder, step=0, milestone=False)
    return folder
