"""The checkpoint format: self-describing, written atomically, read without unpickling.

A checkpoint is a folder `step-{step:09d}` (zero-padded, so name order is step order):

    model.safetensors        unwrapped model weights
    optimizer.safetensors    optimizer tensors, flattened as `state.{param}.{name}`
    trainer_state.json       step, optimizer param groups, scheduler, grad scaler, data position
    rng.safetensors          torch CPU (and CUDA) RNG states of the rank that saved
    model_config.json        the open_clip architecture (`model_cfg`), model name, overrides
    preprocess.json          image preprocessing (open_clip `PreprocessCfg`) and tokenizer spec
    text_tower/              a transformers text tower's config and tokenizer files (no weights)
    config.yaml              the resolved run config

`model_config.json`, `preprocess.json` and `text_tower/` come from the model's `ModelSpec`
(`vlp.models`); with the weights they are all that `vlp.load` and `vlp export` read.

Writing goes to `step-N.tmp/` and is renamed into place only when complete; the run folder's
`latest` file (also replaced atomically) names the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
PREFIX = "step-"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or holds something unreadable."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (safetensors) and the rest (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state_dict["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    model_info: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    files: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint for `step` atomically; prune all but the newest `keep_last`.

    `files` adds files by relative name: a `Path` value is copied, anything else is written as
    JSON (`ModelSpec.checkpoint_files()`: `preprocess.json`, `text_tower/...`).
    """
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / (checkpoint_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, tmp / MODEL_WEIGHTS, metadata={"format": "pt", "step": str(step)})
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file(rng_states(), tmp / "rng.safetensors")
    state = {"step": step, "optimizer": opt_meta, **trainer_state}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    (tmp / MODEL_CONFIG).write_text(json.dumps(model_info, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    for name, content in (files or {}).items():
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_text(json.dumps(content, indent=1))

    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(run_dir / LATEST, final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(
        p for p in run_dir.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
    )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint the `latest` pointer names, else the newest complete one, else None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        candidate = run_dir / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder's latest checkpoint; errors name the path."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (expected a vlp checkpoint folder, "
                                f"which holds {MODEL_CONFIG} and {MODEL_WEIGHTS}, or a run folder)")
    if (path / MODEL_CONFIG).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"checkpoint file missing: {path / MODEL_CONFIG} (and no "
                              f"{PREFIX}* checkpoint inside: {path} is neither a vlp checkpoint "
                              "nor a run folder)")
    return latest


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_model_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    return _read_tensors(Path(ckpt) / MODEL_WEIGHTS)


def load_checkpoint(
    ckpt: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place; return the trainer state (step, ...)."""
    ckpt = Path(ckpt)
    state = read_json(ckpt / "trainer_state.json")
    model.load_state_dict(load_model_weights(ckpt))
    optimizer.load_state_dict(
        unflatten_optimizer_state(_read_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    )
    set_rng_states(_read_tensors(ckpt / "rng.safetensors"))
    return state
